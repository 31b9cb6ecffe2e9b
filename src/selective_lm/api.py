"""The public Python API for users with a training loop of their own: `Selection`, `selective_loss`, `score`.

`selective_loss` is the trainer's selection and loss (`loss.selective_loss_of_losses`, the same
`selection.select`) on tensors any loop has: logits `[B, T, V]` (or final hidden states and the LM
head) and Hugging Face labels `[B, T]` (-100 where nothing is trained; position t's logits come
from t - 1, as transformers shifts them). `score` writes the reference's per-token losses as a
column of a `datasets.Dataset`, with `slm score`'s computation (`frozen.model_token_losses`) and
its way of resuming. `SelectiveTrainer` (transformers) and the TRL recipe live in `hf_trainer.py`.

Bad input raises `UserError` with the CLI's messages: a selection the config would refuse (named by
its `train.*` key, as `slm` names it), a score column of another length than the tokens, token ids
beyond the model's vocabulary. Nothing is broadcast silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config, TrainConfig, describe_error
from .errors import UserError
from .files import atomic_path, fingerprint, read_json, write_json
from .method import spec
from .method.loss import (
    DEFAULT_CHUNK_SIZE,
    SelectiveLoss,
    selective_loss_of_losses,
    token_entropies,
    token_losses,
)

if TYPE_CHECKING:
    import datasets

__all__ = ["Selection", "score", "selective_loss"]

IGNORE_INDEX = -100  # transformers' label for "no loss here"


@dataclass(frozen=True)
class Selection(spec.Selection):
    """Which tokens train (`method.spec.Selection`, the value the loss reads), validated as `slm train` validates
    its `train.*` keys, with the CLI's messages (a UserError naming the key).

    method: topk, bottomk (the lowest scores), random, stochastic, clm (every token) or a plugin's strategy;
    ratio in (0, 1]: the share of each scope unit's valid tokens; score: excess (own - reference loss, Rho-1),
    loss, reference, retrospective, none or a plugin's; rule: topk (the ratio's count), positive (score > 0) or
    threshold (score > `threshold`); scope: batch (one ranking over the micro-batch), sequence (per row) or global
    (all ranks' micro-batches); temperature / soft / stochastic as `train.temperature`, `train.soft`,
    `train.stochastic`. The default is Rho-1's: top 60 % by excess loss over the batch.
    """

    def __post_init__(self) -> None:
        self.train_config()  # refuse what `slm train` would refuse, with its message
        if self.objective != "ce":  # would silently be CLM here: its objective needs what the step alone has
            raise UserError(f"method={self.method!r} is a training objective of `slm train` (train.method="
                            f"{self.method}), not a token selection: the Python API selects tokens only")

    def train_config(self) -> TrainConfig:
        """The `train` section these fields make (UserError naming the `train.*` key, like the CLI)."""
        from pydantic import ValidationError

        tree = {"train": {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}
        try:  # validated inside a whole Config, so that errors carry the CLI's key path (train.ratio, ...)
            return Config.model_validate(tree).train
        except ValidationError as e:
            raise UserError(describe_error(e, tree)) from None


def valid_targets(labels: Tensor) -> Tensor:
    """bool `[B, T]`: the positions with a target, i.e. labels != -100, never position 0 (nothing predicts it)."""
    valid = labels != IGNORE_INDEX
    valid[:, 0] = False
    return valid


def check_ref_loss(ref_loss: Tensor | None, labels: Tensor, needed: bool) -> None:
    """UserError unless `ref_loss` is a `[B, T]` float tensor shaped like `labels` (when `needed`)."""
    if ref_loss is None:
        if needed:
            raise UserError("this selection reads reference losses but none were given: add a ref_loss column "
                            "with selective_lm.score(), pass a reference model, or use score='loss'")
        return
    if ref_loss.shape != labels.shape:
        raise UserError(f"ref_loss has shape {tuple(ref_loss.shape)}, the labels {tuple(labels.shape)}: the scores "
                        "belong to other tokens; rerun selective_lm.score() on this dataset")
    if not ref_loss.is_floating_point():
        raise UserError(f"ref_loss must be a float tensor, got {ref_loss.dtype}")


def check_tensors(**arrays: Any) -> None:
    """UserError naming the first argument that is neither a torch.Tensor nor None (a list, a numpy array):
    the loss needs tensors on the model's device, and a list would fail deep inside with an AttributeError."""
    for name, value in arrays.items():
        if value is not None and not isinstance(value, Tensor):
            raise UserError(f"{name} must be a torch.Tensor, got {type(value).__name__}: convert it with "
                            f"torch.as_tensor({name}) (on the model's device)")


def logits_token_losses(logits: Tensor, labels: Tensor, valid: Tensor) -> Tensor:
    """Per-token CE `[B, T]` (float32, with grad) of labels[b, t] from logits[b, t - 1]; NaN where not valid."""
    b, t = valid.nonzero(as_tuple=True)
    losses = F.cross_entropy(logits[b, t - 1].float(), labels[b, t], reduction="none")
    out = torch.full(labels.shape, torch.nan, dtype=losses.dtype, device=losses.device)
    return out.index_put((b, t), losses)


def logits_token_entropies(logits: Tensor, valid: Tensor) -> Tensor:
    """The next-token entropy `[B, T]` (no grad) of the distribution at logits[b, t - 1]; NaN where not valid."""
    b, t = valid.nonzero(as_tuple=True)
    with torch.no_grad():
        ent = torch.special.entr(logits[b, t - 1].float().softmax(-1)).sum(-1)
    out = torch.full(valid.shape, torch.nan, dtype=ent.dtype, device=ent.device)
    return out.index_put((b, t), ent)


def selective_loss(
    logits_or_hidden: Tensor,
    labels: Tensor,
    ref_loss: Tensor | None = None,
    rule: Selection | None = None,
    *,
    head: nn.Module | None = None,
    generator: torch.Generator | None = None,
    group: dist.ProcessGroup | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> SelectiveLoss:
    """The selective loss of one micro-batch, as `slm train` computes it.

    logits_or_hidden: logits `[B, T, V]`, or final hidden states `[B, T, H]` with `head` (the LM
    head module: logits are then made a chunk of rows at a time, never `B x T x V`). labels `[B, T]`:
    transformers' labels (the input ids, -100 where nothing trains). ref_loss `[B, T]`: the
    reference loss of each label token (a `score()` column; NaN at position 0), needed by the score
    kinds excess, reference and retrospective. rule: a `Selection` (default: top 60 % by excess).
    generator: the random and stochastic draws (seed it per step for reproducible runs).

    Returns `SelectiveLoss`: `.mean()` is the loss of a single batch. With gradient accumulation,
    backpropagate `loss_sum / N` where N is the `n_selected` of the whole optimizer step (summed
    over micro-batches and ranks): the true mean over trained tokens, as `slm train` and
    `SelectiveTrainer` normalise. The count is known before the forward pass for ratio rules:
    `selection.num_selected(n_valid, ratio)` per scope unit.
    """
    check_tensors(logits_or_hidden=logits_or_hidden, labels=labels, ref_loss=ref_loss)
    if rule is not None and not isinstance(rule, Selection):
        raise UserError(f"rule must be a selective_lm.Selection, got {type(rule).__name__}")
    rule = rule or Selection()
    if labels.dim() != 2 or logits_or_hidden.dim() != 3 or logits_or_hidden.shape[:2] != labels.shape:
        raise UserError(f"logits or hidden states {tuple(logits_or_hidden.shape)} must be [B, T, V or H] for labels "
                        f"{tuple(labels.shape)}")
    check_ref_loss(ref_loss, labels, rule.needs_reference)
    valid = valid_targets(labels)
    targets = labels.clamp_min(0)
    entropy = None
    if head is not None:
        losses = token_losses(logits_or_hidden, head, targets, valid, chunk_size=chunk_size)
        if "student_logits" in rule.needs:
            entropy = token_entropies(logits_or_hidden, head, targets, valid, chunk_size=chunk_size)
    else:
        losses = logits_token_losses(logits_or_hidden, targets, valid)
        if "student_logits" in rule.needs:
            entropy = logits_token_entropies(logits_or_hidden, valid)
    if ref_loss is not None:
        ref_loss = ref_loss.to(losses.device)
    try:
        return selective_loss_of_losses(losses, valid, ref_loss, rule, entropy=entropy, generator=generator,
                                        group=group, check_finite=True)
    except ValueError as e:
        raise UserError(str(e)) from None


# --------------------------------------------------------------------------- scoring a datasets.Dataset


def _model_digest(model: nn.Module) -> str:
    """Identifies the weights for resuming: every parameter's name, shape, dtype and first and last values."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(torch.cat([flat[:64], flat[-64:]]).double().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _load_reference(reference: nn.Module | str | Path) -> nn.Module:
    if isinstance(reference, nn.Module):
        return reference
    from transformers import AutoModelForCausalLM

    from .training.models import hub_error

    try:
        return AutoModelForCausalLM.from_pretrained(str(reference), use_safetensors=True, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise hub_error(str(reference), e) from None


def _lengths_and_digest(dataset: datasets.Dataset) -> tuple[np.ndarray, str]:
    """Every row's `input_ids` length, and a digest of all the ids (for resuming), read from Arrow a slice at
    a time: no Python lists, and the same digest for the same tokens however the dataset was made."""
    import pyarrow.compute as pc

    if "input_ids" not in dataset.column_names:
        raise UserError(f"the dataset has no input_ids column (columns: {', '.join(dataset.column_names)}): "
                        "tokenize it first")
    table = dataset.select_columns(["input_ids"]).with_format("arrow")
    h, parts = hashlib.sha256(), []
    for i in range(0, len(dataset), 65536):
        col = table[i : i + 65536]["input_ids"]
        parts.append(pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64))
        h.update(parts[-1].tobytes())
        h.update(pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)), h.hexdigest()[:16]


def score(
    reference: nn.Module | str | Path,
    dataset: datasets.Dataset,
    *,
    column: str = "ref_loss",
    batch_size: int = 8,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    dtype: str = "float32",
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
) -> datasets.Dataset:
    """`dataset` with a new column of the reference's per-token losses: `column[i][t]` is the loss of
    `input_ids[i][t]` given `input_ids[i][:t]`, NaN at t = 0; float32 lists of each row's length.

    reference: a causal LM (plain or peft) or a local directory / hub id of one (safetensors).
    Rows are unpadded token lists of any lengths, scored `batch_size` consecutive rows at a time
    (right-padded: causal attention makes the padding invisible), by the same function as
    `slm score`, so a token store's blocks get the same values. `dtype` rounds the stored losses
    as `scoring.dtype` does. With `cache_dir` the pass is resumable as `slm score` is: losses go
    into a memory-mapped file there with a progress file after every batch; a rerun with the same
    data, weights, batch size and dtype continues where a kill stopped it, and a finished pass
    is read back without scoring.
    """
    from tqdm.auto import tqdm

    from .store.blocks import SCORE_STORAGE, decode_scores
    from .store.frozen import encode_losses, model_token_losses

    if dtype not in SCORE_STORAGE:
        raise UserError(f"invalid value for scoring.dtype: {dtype!r} (choices: {', '.join(SCORE_STORAGE)})")
    if batch_size < 1:
        raise UserError(f"invalid value for scoring.batch_size: must be >= 1 (got {batch_size})")
    if column in dataset.column_names:
        raise UserError(f"the dataset already has a {column!r} column: drop it (remove_columns) or choose another")
    model = _load_reference(reference)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.eval().requires_grad_(False).to(dev)
    lengths, tokens_digest = _lengths_and_digest(dataset)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n_emb = model.get_input_embeddings().num_embeddings
    key = {"tokens": tokens_digest, "reference": _model_digest(model), "batch_size": batch_size, "dtype": dtype}
    values, done, progress = _open_store(cache_dir, key, len(dataset), int(offsets[-1]), SCORE_STORAGE[dtype])
    ids_table = dataset.select_columns(["input_ids"])
    with tqdm(total=int(offsets[-1]), initial=int(offsets[done]), desc="score", unit="tok", unit_scale=True,
              dynamic_ncols=True) as bar:
        while done < len(dataset):
            stop = min(done + batch_size, len(dataset))
            rows = ids_table[done:stop]["input_ids"]
            width = max(int(lengths[done:stop].max()), 1)
            ids = torch.zeros(stop - done, width, dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            if int(ids.max()) >= n_emb or int(ids.min()) < 0:
                raise UserError(f"token id {int(ids.max())} is beyond the reference's {n_emb} embeddings: the data "
                                "was tokenized with another tokenizer than the reference's; use the model's own")
            valid = torch.arange(width).unsqueeze(0) < torch.as_tensor(lengths[done:stop]).unsqueeze(1)
            valid[:, 0] = False
            losses = encode_losses(model_token_losses(model, ids.to(dev), valid.to(dev), chunk_size), dtype)
            for i in range(stop - done):
                values[offsets[done + i] : offsets[done + i + 1]] = losses[i, : lengths[done + i]]
            bar.update(int(offsets[stop] - offsets[done]))
            done = stop
            if progress is not None:
                write_json(progress, {**key, "done_rows": done})
    if progress is not None:
        _finish_store(values, progress)
    flat = decode_scores(values, dtype)

    def add(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        return {column: [flat[offsets[i] : offsets[i + 1]].tolist() for i in indices]}

    from datasets import Sequence, Value

    features = dataset.features.copy()
    features[column] = Sequence(Value("float32"))
    return dataset.map(add, with_indices=True, batched=True, features=features, desc=f"add {column}")


def _open_store(cache_dir: str | Path | None, key: dict[str, Any], n_rows: int, n_tokens: int,
                dtype: np.dtype) -> tuple[np.ndarray, int, Path | None]:
    """(flat losses, rows already scored, progress file or None): in memory without `cache_dir`; else the
    finished file of the same `key` (all rows done), or its interrupted pass, or a new partial memmap."""
    if cache_dir is None:
        return np.full(n_tokens, np.nan, dtype=np.float32).astype(dtype), 0, None
    root = Path(cache_dir) / fingerprint(key)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write scores to {root}: {e.strerror or e}") from None
    final, partial, progress = root / "ref_loss.npy", root / ".ref_loss.partial.npy", root / "progress.json"
    if final.is_file():
        return np.load(final, mmap_mode="r"), n_rows, None
    state = read_json(progress) if progress.is_file() else {}
    if partial.is_file() and all(state.get(k) == v for k, v in key.items()):
        return np.lib.format.open_memmap(partial, mode="r+"), int(state.get("done_rows", 0)), progress
    array = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=(n_tokens,))
    write_json(progress, {**key, "done_rows": 0})
    return array, 0, progress


def _finish_store(values: np.ndarray, progress: Path) -> None:
    """Rename the complete partial memmap to ref_loss.npy (atomically); the progress file goes."""
    if isinstance(values, np.memmap):
        values.flush()
    with atomic_path(progress.with_name("ref_loss.npy")) as tmp:
        progress.with_name(".ref_loss.partial.npy").replace(tmp)
    progress.unlink()
