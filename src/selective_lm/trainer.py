"""The one training loop, on accelerate: CLM, the oracle, every SLM variant, and the reference.

Compute-matched by construction: every run starts from the same base weights, reads the same
blocks in the same order (a permutation seeded by `train.seed` only), for the same number of
optimizer steps; only the loss mask differs. CLM is SLM at ratio 1; `oracle` is CLM on every
token except the injected noise.

Gradient normalisation: each micro-batch backpropagates the *sum* of its selected token
losses; the engine averages the gradients over ranks at the step's last micro-batch, and the
trainer then scales them by world / (tokens selected in the whole step on all ranks). The
update is therefore the gradient of the true mean over trained tokens, whatever the
accumulation or the per-batch selected count (torchtune's normalisation).

Engines: the model is wrapped in `loss.SelectiveLM`, whose forward returns the selective loss,
so the engines see an ordinary forward/backward. `train.parallel=ddp` (default) goes through
`accelerate.prepare` (DDP when launched on several processes); `train.parallel=fsdp` shards every
decoder layer and the root with torch's FSDP2 (`fully_shard`), on GPUs (NCCL) and on CPUs
(gloo) alike: accelerate 1.x routes its own FSDP plugin to GPUs only, so the trainer applies
FSDP2 itself, and a launch with accelerate's FSDP config (`--use_fsdp`) takes this path too.
Checkpoints gather the trainable weights and the optimizer state in full on the main process
(torch.distributed.checkpoint's state-dict API), so a run resumes on any number of processes.
Data parallel runs start from identical weights because LoRA's random init is seeded by
`train.seed` (as is the global RNG that dropout draws from); launch them with
`accelerate launch --multi_gpu --num_processes N` (on CPU too: accelerate's `--cpu` with N > 1
needs MPI and otherwise starts one process).

`slm train` (train.py) and `slm reference` (reference.py) both run it; it imports no stage.

Metrics: `log.jsonl` on rank 0, and the same scalars through accelerate's TensorBoard tracker
under `runs/<name>/tb/` when `tensorboard` is installed.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import __version__
from .analysis import selection as diag
from .config import BASELINE_METHODS, Config, SelectionRule, TrainConfig
from .errors import UserError
from .files import atomic_dir, atomic_path, fingerprint, read_json, write_json, write_text
from .frozen import model_token_losses
from .layout import BlockOrder, HalfScores, OutDir, RunDir, TokenStore, store_config_fingerprint
from .loss import SelectiveLM, SelectiveLoss
from .models import apply_lora, load_model, load_tokenizer, tokenizer_fingerprint
from .outconfig import differences
from .selection import NEEDS_REFERENCE, trainable_mask
from .selfref import SelfReference, extra_bytes, local_tensor

# Per-step sums (over micro-batches and ranks) that the log is made of; the selection diagnostics follow.
STEP_KEYS = ("loss_sum", "n_selected", "n_valid", "n_fed", "score_selected", "score_unselected", "n_unselected")
STAT_KEYS = (*STEP_KEYS, *diag.FIELDS)


class NumericalError(UserError):
    """A non-finite loss or gradient: the run stops, its last checkpoint stays the good one."""


def _lr_lambda(cfg: TrainConfig):
    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device`: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil  # accelerate's dependency

    return psutil.virtual_memory().available


def _state_options(**kwargs: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


class Trainer:
    """Holds one run's state; `fit()` runs or resumes it. Validates everything before writing."""

    def __init__(self, cfg: Config, out: OutDir, run: RunDir, *, split: str = "train",
                 reference_model: Any = None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import is_tensorboard_available

        self.cfg, self.t, self.out, self.run = cfg, cfg.train, out, run
        self.name = run.name
        self.rule = self.t.selection_rule()
        mp = self.t.mixed_precision
        self.acc = Accelerator(  # creates nothing on disk: the tracker starts in fit(), after validation
            cpu=not torch.cuda.is_available(),
            mixed_precision=("bf16" if torch.cuda.is_available() else "no") if mp == "auto" else mp,
            log_with="tensorboard" if is_tensorboard_available() else None, project_dir=str(self.run.path),
        )
        self.split = split
        self.store: TokenStore = out.store(split)
        self.tokenizer = load_tokenizer(cfg.model)
        self._check_store()
        self.ref_loss: np.ndarray | HalfScores | None = None
        # A self-reference (reference.mode ema/checkpoint) is the student's own earlier weights (selfref.py);
        # every selecting run, controls included, trains every token for its first reference.start_step steps.
        own_reference = cfg.reference.is_self and split == "train"
        self.warmup = cfg.reference.start_step if own_reference and self.t.method not in BASELINE_METHODS else 0
        # Online: the reference model scores each micro-batch (it must be the one the offline scores would
        # come from); stored scores are then not used at all, not even for the diagnostics.
        self.online = self.t.needs_reference() and cfg.scoring.mode == "online" and not own_reference
        if self.online and reference_model is None:
            raise UserError("scoring.mode=online needs the reference model (run through `slm run`)")
        self.reference_model = reference_model.to(self.acc.device) if self.online else None
        tok_fp = tokenizer_fingerprint(self.tokenizer)
        dtype = cfg.scoring.dtype  # any stored dtype reads as float32; a store of another dtype is refused
        # A self-reference's selecting runs read no stored scores either: those come from another reference. Its
        # baselines read them for their diagnostics like any CLM run, so they are the same runs (same hash).
        reads_store = not self.online and not self.warmup
        if reads_store and self.t.needs_reference():
            self.ref_loss = out.scores(split, self.store, tok_fp, dtype)
        elif reads_store and out.has_scores(split):  # diagnostics only
            with contextlib.suppress(UserError):
                self.ref_loss = out.scores(split, self.store, tok_fp, dtype)
        if self.t.method == "oracle" and self.store.noise_mask is None:
            raise UserError("method oracle needs a train split with a noise mask (data.noise_rate > 0)")
        model = load_model(cfg.model, vocab_size=len(self.tokenizer))
        self._check_model(model)
        # Compute-matched runs and data-parallel ranks must start from the same LoRA init, whatever the
        # process drew before; dropout then draws from the same seeded stream (restored on resume).
        torch.manual_seed(self.t.seed)
        if self.t.gradient_checkpointing:  # before LoRA: peft then makes the frozen embeddings' output need grad
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.model = (apply_lora(model, cfg.model) if cfg.model.lora else model).to(self.acc.device)
        if not cfg.model.lora:
            self.model.requires_grad_(True)
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.engine = self._wrap(SelectiveLM(self.model))
        params = list(_trainable(self.model).values())  # after wrapping: FSDP turns them into shards
        self.self_ref: SelfReference | None = None
        if own_reference and self.t.needs_reference():
            self._check_self_reference_memory()
            r = cfg.reference
            self.self_ref = SelfReference(_trainable(self.model), r.mode, r.ema_decay, r.checkpoint_step)
        self.optimizer = torch.optim.AdamW(params, lr=self.t.lr, weight_decay=self.t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(self.t))
        self.order = BlockOrder(self.store.tokens.shape[0], self.t.seed)
        self.kind_names: list[str] = (self.store.meta.get("noise") or {}).get("kind_names") or []
        # The learning curve's fixed subsets (students only): the same blocks for every run and step.
        self.curve: dict[str, TokenStore] = {}
        if split == "train" and cfg.eval.every:
            for s in (s for s in cfg.eval.splits if out.store_dir(s).is_dir()):
                self.curve[s] = out.store(s).spread(cfg.eval.curve_tokens)
        if self.ref_loss is not None and not self._scores_cover_reads():
            if self.t.needs_reference():
                raise UserError("the score store lacks blocks this run reads (it was made with scoring.blocks=used "
                                "for a shorter grid or fewer processes): rerun `slm score` with scoring.blocks=all")
            self.ref_loss = None  # diagnostics only: better none than biased

    @property
    def fsdp(self) -> bool:
        """FSDP asked by the config or by accelerate's FSDP launch config; one process has nothing to shard."""
        from accelerate.utils import DistributedType

        asked = self.t.parallel == "fsdp" or self.acc.distributed_type == DistributedType.FSDP
        return asked and self.world > 1

    def _wrap(self, module: SelectiveLM) -> torch.nn.Module:
        """DDP through accelerate, or FSDP2 over every decoder layer and the root (module docstring)."""
        from accelerate.utils import DistributedType

        if self.acc.distributed_type == DistributedType.DEEPSPEED:
            raise UserError("DeepSpeed is not supported: launch with DDP (the default) or set train.parallel=fsdp")
        if not self.fsdp:
            return self.acc.prepare(module)
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # public from torch 2.6
            raise UserError(f"train.parallel=fsdp needs FSDP2 (torch >= 2.6; this is {torch.__version__}): "
                            "upgrade torch or use train.parallel=ddp") from None

        lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        layer_types = set(getattr(lm, "_no_split_modules", None) or ())
        layers = [m for m in module.modules() if type(m).__name__ in layer_types]
        if not layers:
            raise UserError(f"train.parallel=fsdp: {type(lm).__name__} names no decoder layer class "
                            "(_no_split_modules) to shard; use train.parallel=ddp")
        for layer in layers:
            fully_shard(layer)
        return fully_shard(module)

    def _scores_cover_reads(self) -> bool:
        """Whether every block this run reads has reference losses (stores scored with blocks=used)."""
        rows = np.unique(self.order.blocks(0, self.t.steps * self.t.batch_size * self.t.grad_accum * self.world))
        return not np.isnan(np.asarray(self.ref_loss[rows])[:, 1:]).any()

    # ------------------------------------------------------------------ checks

    def _check_store(self) -> None:
        meta = self.store.meta
        if meta.get("tokenizer_fingerprint") != tokenizer_fingerprint(self.tokenizer):
            raise UserError(f"the token store was built with tokenizer {meta.get('tokenizer')!r}, not the one of "
                            f"model {self.cfg.model.name!r}: rerun `slm prepare` with this model")
        if meta.get("block_len") != self.cfg.data.block_len:
            raise UserError(f"the token store has block_len {meta.get('block_len')}, the config "
                            f"{self.cfg.data.block_len}: rerun `slm prepare` or set data.block_len")
        if meta.get("config_fingerprint") not in (None, store_config_fingerprint(self.cfg, self.split)):
            raise UserError(f"the token store in {self.store.path} was built from other data settings than "
                            "the config's: rerun `slm prepare` with this config")

    def _check_self_reference_memory(self) -> None:
        """A self-reference copies the trainable weights: refuse one that would not fit (full fine-tuning)."""
        need = extra_bytes(_trainable(self.model))
        free = _free_memory(self.acc.device)
        if need > 0.9 * free:
            raise UserError(f"reference.mode={self.cfg.reference.mode} keeps a copy of the trainable weights: "
                            f"{need / 2**30:.2f} GiB more on {self.acc.device}, where {free / 2**30:.2f} GiB are "
                            "free; use model.lora=true, shard the model (train.parallel=fsdp) or reference.mode=self")

    def _check_model(self, model: Any) -> None:
        n_emb = model.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > n_emb:
            raise UserError(f"the tokenizer has {len(self.tokenizer)} tokens but the model's embeddings only "
                            f"{n_emb}: use the model's own tokenizer")
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos is not None and self.cfg.data.block_len > max_pos:
            raise UserError(f"data.block_len {self.cfg.data.block_len} exceeds the model's maximum positions {max_pos}")

    # ------------------------------------------------------------------ data

    def _micro_batches(self, step: int) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                          torch.Tensor | None, torch.Tensor | None]]:
        """This rank's micro-batches of one optimizer step: (rows, input_ids, valid, noise, kinds, ref_loss)."""
        b, a, w = self.t.batch_size, self.t.grad_accum, self.world
        base = step * b * a * w
        for m in range(a):
            # Stream order, not sorted: a token's random draw then depends on its global batch position only,
            # so data parallel equals one process for every strategy.
            rows = self.order.blocks(base + (m * w + self.rank) * b, b)
            ids = torch.from_numpy(np.asarray(self.store.tokens[rows], dtype=np.int64))
            valid = torch.from_numpy(self.store.targets(rows, self.cfg.data.doc_boundaries))  # no prompt tokens
            noise = kinds = None
            if self.store.noise_mask is not None:
                noise = torch.from_numpy(np.asarray(self.store.noise_mask[rows], dtype=bool)).to(self.acc.device)
            if self.store.noise_kind is not None:
                kinds = torch.from_numpy(np.asarray(self.store.noise_kind[rows])).to(self.acc.device)
            ref = torch.from_numpy(np.asarray(self.ref_loss[rows])) if self.ref_loss is not None else None
            yield rows, ids.to(self.acc.device), valid.to(self.acc.device), noise, kinds, ref

    def _online_ref(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self.self_ref is None:
            return model_token_losses(self.reference_model, ids, valid, self.cfg.scoring.chunk_size)
        # The student's forward with the reference's weights swapped in, in eval mode (no dropout draws). FSDP
        # keeps the root's gathered weights after a forward: reshard so that each forward gathers the swapped ones.
        self.model.eval()
        self._reshard()
        with self.self_ref.swapped_in(), self.acc.autocast():
            losses = self.engine(ids, valid, losses_only=True, chunk_size=self.cfg.scoring.chunk_size)["losses"]
            self._reshard()
        self.model.train()
        return losses

    def _reshard(self) -> None:
        if self.fsdp:
            self.engine.reshard()

    def _selection(self, step: int) -> SelectionRule:
        """The step's selection: the run's rule, or every token during a self-reference's warm-up."""
        return SelectionRule("topk", "none", 1.0) if step < self.warmup else self.rule

    # ------------------------------------------------------------------ one step

    def _micro_stats(self, out: Any, ids: torch.Tensor, valid: torch.Tensor, noise: torch.Tensor | None,
                     kinds: torch.Tensor | None, ref: torch.Tensor | None) -> torch.Tensor:
        """One micro-batch's contribution to STAT_KEYS (summed over micro-batches and ranks)."""
        values = {
            "loss_sum": out.loss_sum.detach(), "n_selected": out.n_selected, "n_valid": out.n_valid,
            "n_fed": torch.tensor(float(ids.numel()), device=out.weights.device),
            "score_selected": torch.nan_to_num(out.score_selected) * out.n_selected,
            "score_unselected": torch.nan_to_num(out.score_unselected) * out.n_unselected,
            "n_unselected": out.n_unselected,
        }
        step = torch.stack([values[k].double() for k in STEP_KEYS])
        return torch.cat([step, diag.counts(out.weights, valid, noise, ref, kinds)])

    def _step(self, step: int) -> dict[str, float]:
        """One optimizer step; returns the summed STAT_KEYS plus lr, grad norm and time."""
        start = time.perf_counter()
        self.model.train()
        stats = torch.zeros(len(STAT_KEYS), dtype=torch.float64, device=self.acc.device)
        rule = self._selection(step)
        for m, (rows, ids, valid, noise, kinds, ref) in enumerate(self._micro_batches(step)):
            if (self.online or self.self_ref is not None) and rule.score in NEEDS_REFERENCE:
                ref = self._online_ref(ids, valid)
            train_valid = trainable_mask(valid, noise, oracle=self.t.method == "oracle")
            gen = self._generator(step, m)
            try:
                with self._grad_sync(m == self.t.grad_accum - 1), self.acc.autocast():
                    out = SelectiveLoss(**self.engine(
                        ids, train_valid, ref.to(ids.device) if ref is not None else None,
                        score_kind=rule.score, ratio=rule.ratio, strategy=rule.strategy, scope=self.t.scope,
                        generator=gen, temperature=self.t.temperature, soft=self.t.soft, threshold=rule.threshold,
                        chunk_size=self.cfg.scoring.chunk_size,
                    ))
                    out.loss_sum.backward()
            except ValueError:
                # Selection refuses non-finite own losses; when the weights caused them, say so.
                if all(torch.isfinite(local_tensor(p)).all() for p in _trainable(self.model).values()):
                    raise
                raise NumericalError(f"step {step + 1}: the trainable weights are not finite; the last good "
                                     "checkpoint is kept (lower train.lr)") from None
            stats += self._micro_stats(out, ids, valid, noise, kinds, ref)
            if step == 0 and m == 0 and self.acc.is_main_process:
                self._save_selection_sample(rows, ids, out.weights)
        params = list(_trainable(self.model).values())
        if self.world > 1:
            stats = self.acc.reduce(stats, reduction="sum")
        result = dict(zip(STAT_KEYS, stats.tolist(), strict=True))
        for p in params:  # the engine averaged over ranks: x world / n_selected makes it the true mean
            if p.grad is not None:
                p.grad.div_(max(result["n_selected"], 1.0) / self.world)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.t.max_grad_norm or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP: the norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        if not math.isfinite(float(grad_norm)) or not math.isfinite(result["loss_sum"]):
            raise NumericalError(f"step {step + 1}: loss {result['loss_sum']} / grad norm {float(grad_norm)} is not "
                                 "finite; the last good checkpoint is kept (lower train.lr or check the data)")
        result.update(lr=self.scheduler.get_last_lr()[0], grad_norm=float(grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.self_ref is not None:
            self.self_ref.after_step(step + 1)
        result["step_s"] = time.perf_counter() - start
        return result

    @contextlib.contextmanager
    def _grad_sync(self, sync: bool) -> Iterator[None]:
        """Reduce gradients over ranks only at the step's last micro-batch; the others accumulate locally."""
        if sync or self.world == 1:
            yield
        elif self.fsdp:
            self.engine.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.engine.set_requires_gradient_sync(True)
        else:
            with self.acc.no_sync(self.engine):
                yield

    def _generator(self, step: int, m: int) -> torch.Generator:
        """The selection's random draws for micro-batch `m` of `step`.

        Keyed by the run's identity (method, ratio, seed), so that random and stochastic runs, or two
        ratios, are independent controls; `train.common_random=true` drops method and ratio from the
        key (common random numbers: random-r0.3 then selects a subset of random-r0.5). Keyed by the
        micro-batch's global position, so resumes draw the same tokens and data parallel equals one
        process; `global` scope gathers all ranks' micro-batch m and must draw the same on each.
        """
        position = m if self.t.scope == "global" else m * self.world + self.rank
        key = [self.t.seed, step, position]
        if not self.t.common_random:  # a threshold rule's runs are keyed by their rule (their ratio is 1)
            run = (self.t.method, self.rule.ratio) if self.t.rule == "topk" else (self.t.method, self.t.rule,
                                                                                  self.rule.threshold)
            key.append(int(fingerprint(*run), 16))
        return torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))

    @torch.no_grad()
    def _curve_point(self, step: int, tokens_seen: int) -> dict[str, Any]:
        """Validation loss (token-weighted mean) of the current weights on each split's curve subset.

        Every rank computes it (a sharded model's forward needs them all); the main process writes it.
        """
        self.model.eval()
        val = {}
        for split, store in self.curve.items():
            nats = count = 0.0
            for i in range(0, store.n_blocks, self.cfg.eval.batch_size):
                rows = slice(i, i + self.cfg.eval.batch_size)
                ids = torch.from_numpy(store.tokens[rows].astype(np.int64)).to(self.acc.device)
                valid = torch.from_numpy(store.targets(rows, self.cfg.data.doc_boundaries)).to(self.acc.device)
                with self.acc.autocast():  # through the engine: FSDP gathers the head in its forward
                    losses = self.engine(ids, valid, losses_only=True, chunk_size=self.cfg.scoring.chunk_size)["losses"]
                nats += float(losses.nansum())
                count += float(valid.sum())
            val[split] = nats / max(count, 1.0)
        self.model.train()
        return {"step": step, "tokens_seen": tokens_seen, "val_loss": val}

    def _save_selection_sample(self, rows: np.ndarray, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """The first micro-batch's selection: the same blocks in every run, for the highlight page."""
        path = self.run.selection_sample
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, rows=rows, tokens=ids.cpu().numpy(), weights=weights.float().cpu().numpy())

    # ------------------------------------------------------------------ checkpoints

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights under the model's own names, in full on the main process (a collective)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.engine, options=_state_options(cpu_offload=True, ignore_frozen_params=True))
        names = _trainable(self.model)  # named_parameters: a tied head is stored once, as its embedding
        return {k: v.contiguous() for k, v in ((k.removeprefix("model."), v) for k, v in state.items()) if k in names}

    def _save_checkpoint(self, step: int, state: dict[str, Any]) -> None:
        """Trainable weights, optimizer (gathered in full), scheduler, RNG (CPU and CUDA); every rank calls it."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        weights = self._trainable_state()
        optim = get_optimizer_state_dict(self.engine, self.optimizer, options=_state_options(cpu_offload=True))
        own = self.self_ref.state_dict() if self.self_ref is not None else None
        if not self.acc.is_main_process:
            return
        path = self.run.checkpoint(step)
        with atomic_dir(path) as tmp:
            save_file(weights, str(tmp / "trainable.safetensors"))
            torch.save(optim, tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            if own is not None:
                save_file(own, str(tmp / "reference.safetensors"))
            write_json(tmp / "state.json", {**state, "step": step})
        for old in self.run.checkpoints.glob("step-*"):  # keep only the newest full checkpoint
            if old.name != path.name:
                shutil.rmtree(old, ignore_errors=True)

    def _latest_checkpoint(self) -> Path | None:
        found = sorted(self.run.checkpoints.glob("step-[0-9]*"))
        return found[-1] if found else None

    def _load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Every rank reads the full checkpoint and keeps its part (the out dir is shared by the ranks)."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        weights = load_file(path / "trainable.safetensors")
        optim = torch.load(path / "optimizer.pt", weights_only=True)
        if set(weights) != set(_trainable(self.model)) or not isinstance(optim.get("state"), dict) \
                or not all(isinstance(k, str) for k in optim["state"]):
            raise UserError(f"checkpoint {path} does not match this run's model or version: delete "
                            f"{self.run.path} to restart")
        set_state_dict(self.engine, self.optimizer, model_state_dict={f"model.{k}": v for k, v in weights.items()},
                       optim_state_dict=optim, options=_state_options(strict=False))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        if self.self_ref is not None:
            self.self_ref.load_state_dict(load_file(path / "reference.safetensors"))
        return json.loads((path / "state.json").read_text())

    def _snapshot(self, step: int) -> None:
        """Trainable weights only, for the paper's trajectory analysis; every rank calls it."""
        weights = self._trainable_state()
        if self.acc.is_main_process:
            with atomic_path(self.run.snapshot(step)) as tmp:
                save_file(weights, str(tmp))

    def _remove_partial_writes(self) -> None:
        """Temp files and dirs (`.<name>.*.tmp`) of atomic writes that a kill cut off: never complete, never read."""
        for tmp in sorted(self.run.path.rglob(".*.tmp")) if self.run.path.is_dir() else []:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ the loop

    def _config_hash(self) -> str:
        """What the run's result depends on: data, model, training, and the reference behind its scores."""
        # A run that reads stored scores, if only for its diagnostics, depends on the reference behind them.
        uses_ref = self.t.needs_reference() or self.ref_loss is not None
        ref = self.out.reference_digest() if uses_ref else None
        if self.warmup:  # a self-reference: its settings, for every selecting run (each has the warm-up)
            ref = self.cfg.reference.model_dump(include={"mode", "ema_decay", "start_step", "checkpoint_step"})
        elif uses_ref and self.cfg.scoring.dtype != "float32":  # rounded scores select (slightly) differently;
            ref = (ref, self.cfg.scoring.dtype)  # float32 keeps the plain digest, so earlier runs stay valid
        # Fields that change how a run is stored or named, not what it learns, stay out of the hash.
        t = self.t.hashed(exclude={"name", "checkpoint_every", "merge", "parallel", "gradient_checkpointing"})
        curve = self.cfg.eval.model_dump(include={"splits", "every", "curve_tokens"}) if self.curve else None
        # The store's content too: the code that packs it may change while the data settings do not.
        # Every process reads its own batch_size x grad_accum blocks per step: the process count is part of the run
        # (left out for one process, so runs made before it was recorded keep their hash).
        world = [self.world] if self.world > 1 else []
        return fingerprint(self.cfg.data.hashed(), self.store.fingerprint, self.cfg.model.model_dump(), t, ref,
                           curve, *world)

    def _check_existing(self, config_hash: str, replace_stale: bool) -> dict[str, Any] | None:
        """The finished summary when the run is done; clears (or refuses) a run dir of another config."""
        summary_path, ckpt = self.run.summary_path, self._latest_checkpoint()
        found = None
        if summary_path.is_file():
            found = read_json(summary_path).get("config_hash")
        elif ckpt is not None:
            found = read_json(ckpt / "state.json").get("config_hash")
        if found is None or found == config_hash:  # a checkpoint without train.json: resume it
            return read_json(summary_path) if summary_path.is_file() else None
        what = ", ".join(differences(self.run.config_path, self.cfg)[:4]) or "the same settings, another process " \
            "count or other inputs (token store, reference)"
        if not replace_stale:
            raise UserError(f"{self.run.path} holds a run of another config ({what}): set train.name=<a new name> "
                            "to keep both, or move that directory away to replace it")
        if self.acc.is_main_process:  # never deleted: moved aside, with a line saying where
            aside = self.out.stale_dir(self.run.path)
            aside.parent.mkdir(parents=True, exist_ok=True)
            self.run.path.rename(aside)
            print(f"slm: {self.run.path} held a run of another config ({what}); moved it to {aside}", file=sys.stderr)
        self.acc.wait_for_everyone()
        return None

    def fit(self, replace_stale: bool = False) -> dict[str, Any]:
        config_hash = self._config_hash()
        done = self._check_existing(config_hash, replace_stale)
        if done is not None:
            return done
        main = self.acc.is_main_process
        if main:
            self._remove_partial_writes()
        state: dict[str, Any] = {"step": 0, "tokens_seen": 0, "tokens_trained": 0, "config_hash": config_hash,
                                 "diag": dict.fromkeys(diag.FIELDS, 0.0)}
        ckpt = self._latest_checkpoint()
        if ckpt is not None:
            state = self._load_checkpoint(ckpt)
        else:
            if main:
                self.run.path.mkdir(parents=True, exist_ok=True)
                write_text(self.run.config_path, self.cfg.to_yaml())
            self.acc.wait_for_everyone()
            if self.t.snapshot_every:
                self._snapshot(0)
        log_path, curve_path = self.run.log_path, self.run.curve_path
        first_point = self._curve_point(0, 0) if self.curve and state["step"] == 0 else None
        if main:  # drop records past the checkpoint we resume from (and a line a kill cut short)
            for path, records in ((log_path, self.run.log()), (curve_path, self.run.curve())):
                kept = [r for r in records if r["step"] <= state["step"]]
                write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
            if first_point is not None:
                write_text(curve_path, json.dumps(first_point) + "\n")
        # TensorBoard hides the events a killed run logged past the checkpoint (purge_step).
        self.acc.init_trackers("tb", init_kwargs={"tensorboard": {"purge_step": state["step"] + 1}})
        bar = tqdm(total=self.t.steps, initial=state["step"], desc=f"train {self.name}", disable=not main,
                   unit="step", dynamic_ncols=True)
        try:
            with open(log_path, "a") if main else contextlib.nullcontext() as log, \
                    open(curve_path, "a") if main else contextlib.nullcontext() as curve:
                for step in range(state["step"], self.t.steps):
                    rng = torch.get_rng_state()
                    try:
                        sums = self._step(step)
                    except KeyboardInterrupt:
                        # Resume from the last finished step, with its RNG; with several processes a collective
                        # after an interrupt could hang, so those resume from the last periodic checkpoint.
                        if self.world == 1 and state["step"] > 0:
                            torch.set_rng_state(rng)
                            self._save_checkpoint(state["step"], state)
                        raise
                    record = self._advance(state, sums)
                    scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
                    scalars |= {f"selected_by_kind/{k}": v for k, v in record["selected_by_kind"].items()}
                    self.acc.log(scalars, step=record["step"])
                    if main:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                        bar.set_postfix(loss=f"{record['loss'] or 0:.3f}", sel=f"{record['selected_frac']:.2f}")
                        bar.update(1)
                    if self.curve and ((step + 1) % self.cfg.eval.every == 0 or step + 1 == self.t.steps):
                        point = self._curve_point(step + 1, state["tokens_seen"])
                        if main:
                            curve.write(json.dumps(point) + "\n")
                            curve.flush()
                    if self.t.snapshot_every and (step + 1) % self.t.snapshot_every == 0:
                        self._snapshot(step + 1)
                    if self.t.checkpoint_every and (step + 1) % self.t.checkpoint_every == 0:
                        self._save_checkpoint(step + 1, state)
        finally:
            bar.close()
            for tracker in self.acc.trackers:  # not acc.end_training(): that would end the process group too
                tracker.finish()
        self._save_checkpoint(self.t.steps, state)
        self._save_final()
        if not main:
            return {}
        last = self.run.log()[-1]
        summary = {
            "name": self.name, "method": self.t.method, "strategy": self.rule.strategy, "score": self.rule.score,
            "ratio": self.rule.ratio if self.rule.threshold is None else None, "rule": self.t.rule,
            "threshold": self.rule.threshold, "scope": self.t.scope, "seed": self.t.seed, "steps": state["step"],
            "tokens_seen": state["tokens_seen"], "tokens_trained": state["tokens_trained"],
            "selected_share": _ratio(state["tokens_trained"], state.get("tokens_valid", 0)),
            "train_loss_final": last["loss"],
            "selection": {**diag.diagnostics(state["diag"]), "by_kind": diag.by_kind(state["diag"], self.kind_names)},
            "config_hash": config_hash, "processes": self.world, "version": __version__,
        }
        write_json(self.run.summary_path, summary)
        return summary

    def _advance(self, state: dict[str, Any], sums: dict[str, float]) -> dict[str, Any]:
        """Fold one step's sums into the run state; return the step's log record."""
        state["step"] += 1
        state["tokens_seen"] += int(sums["n_fed"])
        state["tokens_trained"] += int(round(sums["n_selected"]))
        state["tokens_valid"] = state.get("tokens_valid", 0) + int(sums["n_valid"])  # absent in older checkpoints
        for k in diag.FIELDS:
            state["diag"][k] = state["diag"].get(k, 0.0) + sums[k]
        n_sel = sums["n_selected"]
        return {
            "step": state["step"], "tokens_seen": state["tokens_seen"], "tokens_trained": state["tokens_trained"],
            "loss": _ratio(sums["loss_sum"], n_sel), "selected_frac": n_sel / max(sums["n_valid"], 1.0),
            "score_selected": _ratio(sums["score_selected"], n_sel),
            "score_unselected": _ratio(sums["score_unselected"], sums["n_unselected"]),
            "lr": sums["lr"], "grad_norm": sums["grad_norm"], "step_s": sums["step_s"],
            "selected_by_kind": {k: v for k, v in diag.by_kind(sums, self.kind_names).items() if v is not None},
        }

    def _save_final(self) -> None:
        """The adapter (PEFT format) or the whole model (HF format); every rank calls it, the main one writes."""
        weights = self._trainable_state()
        if not self.acc.is_main_process:
            return
        if self.cfg.model.lora:
            with atomic_dir(self.run.adapter_dir) as tmp:
                self.model.save_pretrained(tmp, state_dict=weights)
            if self.t.merge:  # never sharded: the config refuses merge with fsdp
                with atomic_dir(self.run.merged_dir) as tmp:
                    self.model.merge_and_unload().save_pretrained(tmp)
                    self.tokenizer.save_pretrained(tmp)
        else:
            with atomic_dir(self.run.model_dir) as tmp:
                self.model.save_pretrained(tmp, state_dict=weights)
                self.tokenizer.save_pretrained(tmp)


def _rng_state() -> dict[str, torch.Tensor | None]:
    """The RNG streams dropout draws from: CPU, and the current CUDA device's (exact resume on GPUs)."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None
