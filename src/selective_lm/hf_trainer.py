"""SLM inside transformers' `Trainer` and TRL's `SFTTrainer`: `SelectiveTrainer`, its collator, the SFT recipe.

`SelectiveMixin.compute_loss` runs the model's ordinary forward (so DDP and the other engines of
`Trainer` see an ordinary forward/backward), then `api.selective_loss` on its logits, with the
reference losses of the batch's `ref_loss` column (see `api.score`) or of an online reference
model. Position t's logits predict `labels[t]`'s token from t - 1, as transformers shifts them.

Normalisation, as `slm train`: the gradient of one optimizer step is that of the sum of the
selected token losses of all its micro-batches (and ranks) divided by their selected count. The
Trainer fetches a step's micro-batches before the first forward (`get_batch_samples`); when the
count follows from the labels alone (every ratio rule: `selection.num_selected` per scope unit)
it is counted there and each micro-batch backpropagates `loss_sum x world / count` (DDP averages
over ranks). A threshold rule's count is known only after each forward: the micro-batch m then
backpropagates `loss_sum_m / C_m` (C_m: tokens selected so far in the step) after scaling the
gradients accumulated so far by `C_{m-1} / C_m`, which ends at the same gradient; DeepSpeed,
which owns the gradients, is refused for it. Either way the logged `loss` is the step's mean over
the selected tokens, and `selected_frac`, `score_selected`, `score_unselected` are logged beside
it (means over the steps since the last log). Random draws are keyed by (seed, step, micro-batch
position) as `slm train` keys them with `train.common_random=true`.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import Trainer

from .api import Selection, check_ref_loss, logits_token_losses, selective_loss, valid_targets
from .errors import UserError
from .method.loss import DEFAULT_CHUNK_SIZE
from .method.selection import num_selected

__all__ = ["SelectiveCollator", "SelectiveMixin", "SelectiveTrainer", "selective_sft_trainer"]

# Per-step sums behind the logged diagnostics.
_STATS = ("n_selected", "n_valid", "score_selected", "n_unselected", "score_unselected")


@dataclass
class SelectiveCollator:
    """Right-pads a list of rows into tensors: input_ids (with `pad_token_id`), labels (-100; the input ids
    when a row has none), attention_mask, and ref_loss (NaN) when the rows have that column.

    A row whose ref_loss (or labels) has another length than its input_ids is refused, never cut or
    broadcast: the scores would belong to other tokens.
    """

    pad_token_id: int = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        n = len(features)
        batch = {"input_ids": torch.full((n, width), self.pad_token_id, dtype=torch.long),
                 "labels": torch.full((n, width), -100, dtype=torch.long),
                 "attention_mask": torch.zeros(n, width, dtype=torch.long)}
        has_ref = "ref_loss" in features[0]
        if has_ref:
            batch["ref_loss"] = torch.full((n, width), float("nan"), dtype=torch.float32)
        for i, f in enumerate(features):
            length = len(f["input_ids"])
            for name in ("labels", "ref_loss") if has_ref else ("labels",):
                if f.get(name) is not None and len(f[name]) != length:
                    raise UserError(f"row {i}: {name} has {len(f[name])} values, input_ids {length}: the "
                                    f"{name} belong to other tokens; rerun selective_lm.score() on this dataset")
            batch["input_ids"][i, :length] = torch.as_tensor(f["input_ids"])
            batch["labels"][i, :length] = torch.as_tensor(f.get("labels") or f["input_ids"])
            batch["attention_mask"][i, :length] = 1
            if has_ref:
                batch["ref_loss"][i, :length] = torch.as_tensor(f["ref_loss"], dtype=torch.float32)
        return batch


def _generator(seed: int, step: int, position: int) -> torch.Generator:
    """`Trainer._generator` of `slm train` with `train.common_random=true`: keyed by seed, step, position."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, position]).generate_state(1)[0]))


class SelectiveMixin:
    """The selective `compute_loss` for a `transformers.Trainer` subclass (module docstring).

    selection: which tokens train (`api.Selection`). reference_model: scores each micro-batch
    online (no `ref_loss` column needed); it must share the student's tokenizer. chunk_size: LM-head
    rows per chunk of the online reference's losses.
    """

    # Our compute_loss normalises over the whole optimizer step: Trainer must not divide it again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, selection: Selection | None = None, reference_model: nn.Module | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.selection = selection or Selection()
        self.rule = self.selection.rule_used
        self.reference_model = reference_model
        self.chunk_size = chunk_size
        self.model_accepts_loss_kwargs = True  # transformers < 5: the same "do not divide" switch
        self._n_emb = student = self.model.get_input_embeddings().num_embeddings
        if reference_model is not None:
            ref = reference_model.get_input_embeddings().num_embeddings
            if ref != student:
                raise UserError(f"the reference model has a vocabulary of {ref}, the student {student}: "
                                "reference and student must share the tokenizer")
            reference_model.eval().requires_grad_(False).to(self.args.device)
        if self.rule.threshold is not None and self.accelerator.distributed_type.value == "DEEPSPEED":
            raise UserError("a threshold rule rescales the accumulated gradients, which DeepSpeed owns: use a ratio "
                            "rule (rule='topk') or DDP")
        self._step_count: Tensor | None = None  # selected tokens of the step, when known before its forwards
        self._so_far = 0.0  # tensor once set: tokens selected so far in the step (threshold rules)
        self._logged_so_far = 0.0
        self._micro = 0
        self._stats = torch.zeros(len(_STATS), dtype=torch.float64)

    # ------------------------------------------------------------------ Trainer hooks

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        if "ref_loss" not in self._signature_columns:
            self._signature_columns.append("ref_loss")  # not a forward argument, but ours to read

    def get_batch_samples(self, *args: Any, **kwargs: Any) -> tuple[list, Any]:
        """The step's micro-batches, as Trainer fetches them; counts their selected tokens when the rule allows."""
        batches, n_items = super().get_batch_samples(*args, **kwargs)  # type: ignore[misc]
        self._micro, self._so_far, self._logged_so_far = 0, 0.0, 0.0
        self._step_count = self._count(batches) if self.rule.threshold is None and batches else None
        return batches, n_items

    def _count(self, batches: list[dict[str, Tensor]]) -> Tensor:
        """Tokens the step's micro-batches select, on all ranks: `num_selected` per scope unit."""
        per_micro = [valid_targets(b["labels"]) for b in batches]
        scope, ratio, world = self.selection.scope, self.rule.ratio, self.accelerator.num_processes
        if scope == "global" and world > 1:  # one ranking per micro-batch index over all ranks
            n_valid = self.accelerator.reduce(torch.stack([v.sum() for v in per_micro]).to(self.args.device), "sum")
            return num_selected(n_valid, ratio).sum().double()
        dim = 1 if scope == "sequence" else None
        count = sum(num_selected(v.sum(dim=dim), ratio).sum() for v in per_micro).double().to(self.args.device)
        return self.accelerator.reduce(count, "sum") if world > 1 else count

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        inputs = dict(inputs)  # Trainer's prediction_step reads the labels of its own dict afterwards
        labels = inputs.pop("labels")
        ref_loss = inputs.pop("ref_loss", None)
        if int(inputs["input_ids"].max()) >= self._n_emb:
            raise UserError(f"token id {int(inputs['input_ids'].max())} is beyond the model's {self._n_emb} "
                            "embeddings: the data was tokenized with another tokenizer; use the model's own")
        outputs = model(**inputs, use_cache=False)
        if not model.training:  # evaluation: the plain mean over every target (perplexity)
            valid = valid_targets(labels)
            loss = logits_token_losses(outputs.logits, labels.clamp_min(0), valid)[valid].mean()
            return (loss, outputs) if return_outputs else loss
        if self.selection.needs_reference and self.reference_model is not None:
            from .store.frozen import model_token_losses

            ref_loss = model_token_losses(self.reference_model, inputs["input_ids"], valid_targets(labels),
                                          self.chunk_size)
        check_ref_loss(ref_loss, labels, self.selection.needs_reference)
        world = self.accelerator.num_processes
        position = self._micro if self.selection.scope == "global" else self._micro * world + self.args.process_index
        out = selective_loss(outputs.logits, labels, ref_loss, self.selection,
                             generator=_generator(self.args.seed, self.state.global_step, position))
        self._micro += 1
        self._stats += torch.stack([
            out.n_selected, out.n_valid, torch.nan_to_num(out.score_selected) * out.n_selected, out.n_unselected,
            torch.nan_to_num(out.score_unselected) * out.n_unselected]).detach().double().cpu()
        if self._step_count is not None:
            loss = out.loss_sum * world / self._step_count.clamp_min(1)
        else:
            loss = self._rescaled(model, out.loss_sum, out.n_selected) * world
        return (loss, outputs) if return_outputs else loss

    def _rescaled(self, model: nn.Module, loss_sum: Tensor, n_selected: Tensor) -> Tensor:
        """Threshold rules: this micro-batch's share of the step's mean so far (module docstring).

        Returns a loss whose gradient is loss_sum / C_m and whose value makes the returned values of the
        step add up to the step's mean (Σ loss_sum / C_M), for Trainer's logged loss.
        """
        count = n_selected.detach().double()
        if self.accelerator.num_processes > 1:
            count = self.accelerator.reduce(count.to(self.args.device), "sum")
        before, now = self._so_far, self._so_far + count
        if self._micro > 1 and float(before) > 0:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_((before / now).to(p.grad.dtype))
        loss = loss_sum / now.clamp_min(1).to(loss_sum.dtype)
        mean = (self._logged_so_far * float(before) + float(loss_sum.detach())) / max(float(now), 1.0)
        value = mean - self._logged_so_far  # telescoping: the values returned so far add up to `mean`
        self._so_far, self._logged_so_far = now, mean
        return loss + (value - loss).detach()

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Trainer's log, with the selection diagnostics of the steps since the last one on training logs."""
        if "loss" in logs and self._stats[1] > 0:
            stats = self._stats.to(self.args.device)
            if self.accelerator.num_processes > 1:
                stats = self.accelerator.reduce(stats, "sum")
            s = dict(zip(_STATS, stats.tolist(), strict=True))
            logs["selected_frac"] = s["n_selected"] / s["n_valid"]
            logs["score_selected"] = s["score_selected"] / max(s["n_selected"], 1e-12)
            if s["n_unselected"]:
                logs["score_unselected"] = s["score_unselected"] / s["n_unselected"]
            self._stats.zero_()
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


class SelectiveTrainer(SelectiveMixin, Trainer):
    """`transformers.Trainer` with SLM: `selection=`, `reference_model=` (see `SelectiveMixin`), and every other
    argument of `Trainer`. Without a data collator it uses `SelectiveCollator`, which keeps the dataset's
    `ref_loss` column (from `selective_lm.score`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("data_collator") is None:
            pad = getattr(kwargs.get("processing_class"), "pad_token_id", None)
            kwargs["data_collator"] = SelectiveCollator(pad if pad is not None else 0)
        super().__init__(*args, **kwargs)


@functools.cache
def _selective_sft_trainer() -> type:
    try:
        from trl import SFTTrainer
    except ImportError:
        raise UserError("the SFT recipe needs TRL: pip install 'selective-lm[trl]' (or pip install trl)") from None

    class SelectiveSFTTrainer(SelectiveMixin, SFTTrainer):
        """TRL's `SFTTrainer` with SLM (see `selective_sft_trainer`)."""

    return SelectiveSFTTrainer


def selective_sft_trainer(*args: Any, selection: Selection | None = None, reference_model: nn.Module | None = None,
                          **kwargs: Any) -> Any:
    """TRL's `SFTTrainer` with SLM: same arguments, plus `selection` and `reference_model`.

    TRL tokenizes prompt/completion data itself and, with its default `completion_only_loss`,
    labels prompt tokens -100. Conversational `{"messages": [...]}` rows TRL would train whole
    (its `assistant_only_loss` needs a template with generation markers, which SmolLM2's lacks):
    the recipe labels them itself (`assistant_only`), every assistant turn trained and every other
    token -100, as `slm prepare`'s chat format. Selection then ranks completion / assistant tokens
    only, and the ratio is a share of them. The reference scores each micro-batch online, since TRL
    builds the tokens after any column could be added; score kinds without a reference (`loss`,
    random) need none. TRL is an optional extra (`pip install 'selective-lm[trl]'`).
    """
    selection = selection or Selection()
    if selection.needs_reference and reference_model is None:
        raise UserError(f"score {selection.score!r} reads reference losses: pass reference_model= (the SFT recipe "
                        "scores online) or use score='loss'")
    cls = _selective_sft_trainer()
    from trl import SFTTrainer

    given = inspect.signature(SFTTrainer.__init__).bind(None, *args, **kwargs).arguments
    del given["self"]
    config = given.get("args")
    if not (getattr(config, "assistant_only_loss", False) or given.get("formatting_func") is not None
            or (getattr(config, "dataset_kwargs", None) or {}).get("skip_prepare_dataset")):
        for name in ("train_dataset", "eval_dataset"):
            if given.get(name) is not None:
                given[name] = assistant_only(given[name], given.get("processing_class"),
                                             getattr(config, "chat_template_path", None))
    return cls(selection=selection, reference_model=reference_model, **given)


def assistant_only(dataset: Any, tokenizer: Any, chat_template_path: str | None = None) -> Any:
    """Conversational language-modeling data (a `messages` column of role/content dicts, or ShareGPT's
    `conversations`) as `input_ids` + `labels`: the assistant turns' tokens labelled, all others -100
    (`chat.chat_labels`: the spans `slm prepare` trains). Other datasets, and dicts of them, as they are.
    `chat_template_path` (SFTConfig's) is refused for such data: TRL would apply it after the labelling."""
    if isinstance(dataset, dict):
        return type(dataset)({k: assistant_only(v, tokenizer, chat_template_path) for k, v in dataset.items()})
    from trl.data_utils import is_conversational, is_conversational_from_value, maybe_convert_to_chatml

    first = next(iter(dataset), None)
    if first is None or "input_ids" in first or not (is_conversational_from_value(first) or (
            "messages" in first and "prompt" not in first and is_conversational(first))):
        return dataset
    if tokenizer is None:
        raise UserError("conversational data is labelled with the tokenizer's chat template: pass processing_class= "
                        "(the tokenizer)")
    if chat_template_path is not None:
        raise UserError("SFTConfig.chat_template_path: the recipe labels conversations with the tokenizer's own chat "
                        "template; set tokenizer.chat_template to the template instead")
    extra = sorted({"tools", "chat_template_kwargs"} & set(first))
    if extra:
        raise UserError(f"conversational rows with {', '.join(extra)}: the recipe renders the messages alone; "
                        "tokenize them yourself into input_ids + labels (-100 outside the assistant turns)")
    from .data.chat import chat_labels

    advice = ("the dataset's messages", "convert the rows to prompt/completion (the last assistant turn trains)")

    def label(row: dict[str, Any], index: int) -> dict[str, list[int]]:
        messages = maybe_convert_to_chatml(dict(row))["messages"]
        out = chat_labels(tokenizer, messages, advice)
        if all(label == -100 for label in out["labels"]):
            roles = sorted({str(m.get("role")) for m in messages})
            raise UserError(f"conversation {index} has no assistant turn to train (roles: {', '.join(roles)}): "
                            "the recipe trains the messages of role 'assistant'")
        return out

    return dataset.map(label, with_indices=True, remove_columns=list(first))
