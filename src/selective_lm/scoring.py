"""The reference model and the score store: `slm reference`, `slm score`.

The reference scores the corpus once; every SLM run of a grid reuses `scores/<split>/`.
`ref_loss[b, t]` is the reference loss of `tokens[b, t]` given `tokens[b, :t]` (NaN at t = 0),
computed by the same `loss.token_losses` as training, so the two can never disagree on the shift.

The store is written incrementally into a partial `.npy` memmap beside a progress file saved
after every batch; a killed `slm score` continues from the last completed batch, and only a
finished pass is renamed to `ref_loss.npy`. `meta.json` holds the
fingerprints of the token store, tokenizer and reference model: `load_scores` refuses any mismatch.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .common import UserError, atomic_path, fingerprint, read_json, write_json
from .config import Config
from .data import BlockOrder, TokenStore, load_store
from .loss import forward_hidden, token_losses, valid_mask
from .models import load_model, load_tokenizer, load_trained, tokenizer_fingerprint


def store_fingerprint(store: TokenStore) -> str:
    return fingerprint(store.meta)


# ---------------------------------------------------------------------------- reference


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def reference(cfg: Config, out: Path) -> dict[str, Any]:
    """Make the reference model available under `out/reference/` and describe it in reference.json.

    `trained`: CLM on the reference split (retrained when its config changed); `self`: the base
    model; `path`: a peft adapter dir (for `model.name`) or an HF model dir, checked here to load
    and to share the student's tokenizer (its own tokenizer files when it has them, else its
    vocabulary size). `digest` identifies the weights, so scores of another reference are refused.
    """
    ref_dir = out / "reference"
    mode = cfg.reference.mode
    tokenizer = load_tokenizer(cfg.model)
    if mode == "trained":
        from .train import train

        summary = train(_reference_train_config(cfg), out, name=None, split="reference", run_dir=ref_dir,
                        replace_stale=True)
        weights = ref_dir / ("adapter" if cfg.model.lora else "model")  # sharded full models too
        desc = {"mode": mode, "base": cfg.model.name, "weights": weights.name,
                "digest": fingerprint([_file_digest(f) for f in sorted(weights.glob("*.safetensors"))]),
                "train": summary}
    elif mode == "self":
        desc = {"mode": mode, "base": cfg.model.name, "digest": fingerprint(cfg.model.name, cfg.model.revision)}
    else:
        path = Path(str(cfg.reference.path)).expanduser()
        if not path.is_dir():
            raise UserError(f"reference.path {path} is not a directory (a peft adapter or HF model dir)")
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise UserError(f"reference.path {path} holds no .safetensors weights (adapter or HF model dir)")
        configs = [f for f in (path / "adapter_config.json", path / "config.json") if f.is_file()]
        desc = {"mode": mode, "base": cfg.model.name, "path": str(path.resolve()),
                "digest": fingerprint([_file_digest(f) for f in files + configs]),
                "own_tokenizer": _check_path_tokenizer(path, tokenizer)}
    desc["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
    desc["version"] = __version__
    if mode == "path":
        _open_reference(cfg, out, desc, tokenizer)  # fail now, not at `slm score`
    write_json(ref_dir / "reference.json", desc)
    return desc


def _check_path_tokenizer(path: Path, tokenizer: Any) -> bool:
    """True if `path` ships a tokenizer (it must then be the student's); False if it has none."""
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return False
    from transformers import AutoTokenizer

    try:
        own = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer in reference.path {path}: {e}") from None
    if tokenizer_fingerprint(own) != tokenizer_fingerprint(tokenizer):
        raise UserError(f"the tokenizer in reference.path {path} differs from the student's: reference and "
                        "student must share the tokenizer")
    return True


def _reference_train_config(cfg: Config) -> Config:
    """CLM on the reference split with the reference section's budget; everything else as the students."""
    r = cfg.reference
    train = cfg.train.model_copy(update={
        "name": "reference", "method": "clm", "ratio": 1.0, "steps": r.steps, "batch_size": r.batch_size,
        "grad_accum": r.grad_accum, "lr": r.lr, "snapshot_every": 0, "merge": False,
    })
    return cfg.model_copy(update={"train": train})


def load_reference_model(cfg: Config, out: Path) -> Any:
    """The reference as a plain causal LM in eval mode (LoRA merged: scoring needs no adapter overhead)."""
    desc_path = out / "reference" / "reference.json"
    if not desc_path.is_file():
        raise UserError(f"no reference model in {out}/reference: run `slm reference --out {out}` first")
    desc = read_json(desc_path)
    tokenizer = load_tokenizer(cfg.model)
    if desc.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
        raise UserError("the reference model's tokenizer differs from the student's: they must share one "
                        f"(rerun `slm reference --out {out}`)")
    return _open_reference(cfg, out, desc, tokenizer)


def _open_reference(cfg: Config, out: Path, desc: dict[str, Any], tokenizer: Any) -> Any:
    """Load the reference that `desc` (reference.json) describes and check its vocabulary."""
    ref_dir = out / "reference"
    if desc["mode"] == "self":
        model = load_model(cfg.model, vocab_size=len(tokenizer))
    elif desc["mode"] == "trained" and (ref_dir / "model").is_dir():
        model = load_model(cfg.model, path=str(ref_dir / "model"))
    else:
        adapter = ref_dir / "adapter" if desc["mode"] == "trained" else Path(desc["path"])
        try:
            model = load_trained(cfg.model, adapter, len(tokenizer))
        except RuntimeError as e:  # peft/torch: an adapter of another base model (shape mismatch)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"the reference in {adapter} does not fit model {cfg.model.name}: {first}") from None
    n_emb = model.get_input_embeddings().num_embeddings
    if n_emb < len(tokenizer):
        raise UserError(f"the reference model has {n_emb} embeddings but the tokenizer {len(tokenizer)} tokens: "
                        "reference and student must share the tokenizer")
    if desc["mode"] == "path" and not desc.get("own_tokenizer"):
        # No tokenizer files to compare: a vocabulary of another size means another tokenizer.
        student = _student_vocab_size(cfg, tokenizer)
        if student is not None and n_emb != student:
            raise UserError(f"the reference model in {desc['path']} has a vocabulary of {n_emb}, the student "
                            f"{student}: reference and student must share the tokenizer")
    model.eval().requires_grad_(False)
    return model


def _student_vocab_size(cfg: Config, tokenizer: Any) -> int | None:
    """The student's embedding rows, from its config (no weights loaded); None if the config has none."""
    if cfg.model.name.startswith("random:"):
        return len(tokenizer)  # models.load_model builds random models with exactly the tokenizer's size
    from transformers import AutoConfig

    from .models import model_source

    try:
        config = AutoConfig.from_pretrained(model_source(cfg.model), revision=cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError):
        return None
    return getattr(config.get_text_config(), "vocab_size", None)


def reference_digest(out: Path) -> str | None:
    path = out / "reference" / "reference.json"
    return read_json(path)["digest"] if path.is_file() else None


# ---------------------------------------------------------------------------- scoring


@torch.no_grad()
def model_token_losses(model: Any, ids: torch.Tensor, valid: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """float32 `[B, T]` losses of a frozen model (reference, evaluation), NaN where not valid; bf16 on GPU."""
    dtype = torch.bfloat16 if ids.device.type == "cuda" else torch.float32
    with torch.autocast(ids.device.type, dtype=dtype, enabled=ids.device.type == "cuda"):
        hidden, head = forward_hidden(model, ids)
        return token_losses(hidden, head, ids, valid, chunk_size=chunk_size)


def score(cfg: Config, out: Path, split: str = "train", model: Any = None) -> dict[str, Any]:
    """Write `out/scores/<split>/ref_loss.npy`; resumes a killed pass; no-op when already complete.

    Every position t >= 1 is scored, whatever `data.doc_boundaries`: that option only decides which
    positions training uses, so one score store serves both settings.
    """
    store = load_store(out / "data" / split)
    tokenizer = load_tokenizer(cfg.model)
    score_dir = out / "scores" / split
    rows = used_blocks(cfg, store.n_blocks) if cfg.scoring.blocks == "used" else None
    expected = {
        "token_store": store_fingerprint(store),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "reference": reference_digest(out),
        "blocks": "all" if rows is None else fingerprint(rows.tolist()),
    }
    if expected["reference"] is None:
        raise UserError(f"no reference model in {out}/reference: run `slm reference --out {out}` first")
    if (score_dir / "meta.json").is_file() and (score_dir / "ref_loss.npy").is_file():
        meta = read_json(score_dir / "meta.json")
        if all(meta.get(k) == v for k, v in expected.items()):
            return meta
    try:
        score_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write scores to {score_dir}: {e.strerror or e}") from None
    model = model if model is not None else load_reference_model(cfg, out)
    tokens_per_s = token_loss_pass(model, store, score_dir / "ref_loss.npy", expected, f"score {split}",
                                   batch_size=cfg.scoring.batch_size, chunk_size=cfg.scoring.chunk_size, rows=rows)
    n_blocks, block_len = store.tokens.shape
    meta = {**expected, "split": split, "n_blocks": n_blocks, "block_len": block_len,
            "reference_mode": cfg.reference.mode, "tokens_per_s": tokens_per_s, "created_by": __version__,
            "scored_blocks": store.n_blocks if rows is None else len(rows)}
    write_json(score_dir / "meta.json", meta)
    return meta


def _open_partial(partial: Path, shape: tuple[int, int], resume: bool, fill: bool) -> np.ndarray:
    """The partial result memmap: reopened when resuming and intact, else created anew (NaN if `fill`)."""
    if resume:
        try:
            array = np.lib.format.open_memmap(partial, mode="r+")
            if array.shape == shape and array.dtype == np.float32:
                return array
        except (OSError, ValueError):
            pass  # killed while it was being created: start over
    array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)
    if fill:
        array[:] = np.nan
    return array


def token_loss_pass(model: Any, store: TokenStore, target: Path, expected: dict[str, Any], desc: str, *,
                    batch_size: int, chunk_size: int, doc_boundaries: bool = False,
                    rows: np.ndarray | None = None) -> float | None:
    """Per-token losses of every block of `store` into `target` (.npy float32 `[n_blocks, T]`, NaN where no target).

    `doc_boundaries` also masks (NaN) targets whose previous token is in another document.
    `rows` (sorted block indices) restricts the pass to those blocks; the others stay NaN.
    Resumable: rows go into a partial memmap, and after every batch a progress file records how
    many are done; a rerun with the same `expected` fingerprints and batch size continues there,
    in the same batches, so the result is bit-identical to an uninterrupted pass. Only a
    complete pass is renamed to `target`. Returns this call's tokens/s (None if nothing was left).

    No msync per batch: rows written to the shared memmap are in the page cache at once, so a
    killed process loses none (like every file of the project, nothing is fsynced against power
    loss), and a sync per batch would cost a disk round trip per batch on a fast GPU.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    n_blocks, block_len = store.tokens.shape
    partial = target.with_name(f".{target.stem}.partial.npy")
    progress_path = target.with_name(f".{target.stem}.progress.json")
    progress = read_json(progress_path) if progress_path.is_file() else {}
    resume = progress.get("expected") == expected and progress.get("batch_size") == batch_size
    array = _open_partial(partial, (n_blocks, block_len), resume and partial.is_file(), fill=rows is not None)
    todo = np.arange(n_blocks) if rows is None else rows
    done = int(progress.get("done_blocks", 0)) if resume else 0
    start_t, start_done = time.perf_counter(), done
    with tqdm(total=len(todo) * block_len, initial=done * block_len, desc=desc, unit="tok", unit_scale=True,
              dynamic_ncols=True) as bar:
        while done < len(todo):
            batch = todo[done : done + batch_size]
            # One copy: the int32 memmap rows straight into the int64 ids the embedding needs.
            ids = torch.from_numpy(np.asarray(store.tokens[batch], dtype=np.int64)).to(device)
            doc = torch.from_numpy(np.array(store.doc_ids[batch])).to(device) if doc_boundaries else None
            array[batch] = model_token_losses(model, ids, valid_mask(ids, doc_ids=doc), chunk_size).cpu().numpy()
            done += len(batch)
            write_json(progress_path, {"expected": expected, "batch_size": batch_size, "done_blocks": done})
            bar.update(len(batch) * block_len)
    seconds = time.perf_counter() - start_t
    del array
    with atomic_path(target) as tmp:
        partial.replace(tmp)
    progress_path.unlink(missing_ok=True)
    return (done - start_done) * block_len / seconds if done > start_done and seconds > 0 else None


def used_blocks(cfg: Config, n_blocks: int) -> np.ndarray:
    """Sorted blocks that the grid of `cfg` reads in one process: every seed's first steps × batch positions.

    With `scoring.blocks=used` only these are scored (the rest stay NaN): on a CPU, scoring a
    corpus much larger than a short study reads would cost more than the study. A trainer that
    reads other blocks (more steps, more processes) refuses the store.
    """
    t = cfg.train
    count = t.steps * t.batch_size * t.grad_accum
    seeds = range(t.seed, t.seed + cfg.grid.seeds)
    return np.unique(np.concatenate([BlockOrder(n_blocks, s).blocks(0, count) for s in seeds]))


def load_scores(out: Path, split: str, store: TokenStore, tokenizer: Any) -> np.ndarray:
    """The score store of `split` as a read-only memmap, after checking every fingerprint."""
    score_dir = out / "scores" / split
    if not (score_dir / "ref_loss.npy").is_file() or not (score_dir / "meta.json").is_file():
        raise UserError(f"score kind needs reference scores but {score_dir} has none: run `slm score --out {out}` "
                        "(or use train.score=loss / train.method=random)")
    meta = read_json(score_dir / "meta.json")
    if meta.get("token_store") != store_fingerprint(store):
        raise UserError(f"the scores in {score_dir} belong to another token store: rerun `slm score`")
    if meta.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
        raise UserError(f"the scores in {score_dir} were made with another tokenizer: rerun `slm score`")
    current = reference_digest(out)
    if current is not None and meta.get("reference") != current:
        raise UserError(f"the scores in {score_dir} come from another reference model: rerun `slm score`")
    try:
        scores = np.load(score_dir / "ref_loss.npy", mmap_mode="r")
    except (OSError, ValueError) as e:
        raise UserError(f"{score_dir}/ref_loss.npy is unreadable ({e}): rerun `slm score`") from None
    if scores.shape != store.tokens.shape or scores.dtype != np.float32:
        raise UserError(f"{score_dir}/ref_loss.npy has shape {scores.shape}, the tokens {store.tokens.shape}: "
                        "rerun `slm score`")
    return scores
