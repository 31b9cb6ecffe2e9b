"""`slm train`: one loop for CLM and every SLM variant, on accelerate.

Compute-matched by construction: every run starts from the same base weights, reads the same
blocks in the same order (a permutation seeded by `train.seed` only), for the same number of
optimizer steps; only the loss mask differs. CLM is SLM at ratio 1; `oracle` is CLM on every
token except the injected noise.

Gradient normalisation: each micro-batch backpropagates the *sum* of its selected token
losses; at the end of the optimizer step the gradients are summed over ranks (an explicit
all-reduce, equivalent to DDP) and divided by the number of tokens selected in the whole step
on all ranks. The update is therefore the gradient of the true mean over trained tokens,
whatever the accumulation or the per-batch selected count (torchtune's normalisation).
The model is not wrapped in DDP because the selective loss calls the backbone and the LM
head separately, which DDP's forward hooks would not see. Data parallel runs start from
identical weights because LoRA's random init is seeded by `train.seed` (as is the global RNG
that dropout draws from); launch them with `accelerate launch --multi_gpu --num_processes N`
(on CPU too: accelerate's `--cpu` with N > 1 needs MPI and otherwise starts one process).

Metrics: `log.jsonl` on rank 0, and the same scalars through accelerate's TensorBoard tracker
under `runs/<name>/tb/` when `tensorboard` is installed.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import __version__
from .common import UserError, atomic_dir, atomic_path, fingerprint, read_json, write_json, write_text
from .config import Config, TrainConfig
from .data import BlockOrder, TokenStore, config_fingerprint, load_store
from .loss import selective_lm_loss, valid_mask
from .models import apply_lora, load_model, load_tokenizer, tokenizer_fingerprint
from .scoring import load_scores, reference_digest

# Per-step sums (over micro-batches and ranks) that the log and the run's diagnostics are made of.
STAT_KEYS = ("loss_sum", "n_selected", "n_valid", "n_fed", "score_selected", "score_unselected", "n_unselected",
             "noise_selected", "noise_valid", "clean_selected", "clean_valid",
             "ref_selected", "ref_selected_n", "ref_unselected", "ref_unselected_n")
DIAG_KEYS = STAT_KEYS[7:]


class NumericalError(UserError):
    """A non-finite loss or gradient: the run stops, its last checkpoint stays the good one."""


def run_name(train: TrainConfig, with_seed: bool = False) -> str:
    """`clm`, `oracle` or `<method>-r<ratio>`, with `-s<seed>` when several seeds run."""
    if train.name:
        return train.name
    name = train.method if train.method in ("clm", "oracle") else f"{train.method}-r{train.ratio:g}"
    return f"{name}-s{train.seed}" if with_seed else name


def effective(train: TrainConfig) -> tuple[str, str, float]:
    """(strategy, score kind, ratio) that the method really uses."""
    if train.method in ("clm", "oracle"):
        return "topk", "none", 1.0
    if train.method == "random":
        return "random", "none", train.ratio
    if train.method == "stochastic" and train.stochastic == "positive":
        return "stochastic_positive", train.score, train.ratio
    return train.method, train.score, train.ratio


def needs_reference(train: TrainConfig) -> bool:
    return effective(train)[1] in ("excess", "reference")


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


class Trainer:
    """Holds one run's state; `fit()` runs or resumes it. Validates everything before writing."""

    def __init__(self, cfg: Config, out: Path, name: str | None = None, *, split: str = "train",
                 run_dir: Path | None = None, reference_model: Any = None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import is_tensorboard_available

        self.cfg, self.t, self.out = cfg, cfg.train, out
        self.name = name or run_name(cfg.train)
        self.run_dir = run_dir or out / "runs" / self.name
        self.strategy, self.score_kind, self.ratio = effective(self.t)
        if self.strategy == "topk" and self.score_kind == "none" and self.ratio < 1 and not self.t.soft:
            raise UserError("train.score=none with top-k selection would select by position: "
                            "use train.method=random or another train.score")
        mp = self.t.mixed_precision
        self.acc = Accelerator(  # creates nothing on disk: the tracker starts in fit(), after validation
            cpu=not torch.cuda.is_available(),
            mixed_precision=("bf16" if torch.cuda.is_available() else "no") if mp == "auto" else mp,
            log_with="tensorboard" if is_tensorboard_available() else None, project_dir=str(self.run_dir),
        )
        self.split = split
        self.store: TokenStore = load_store(out / "data" / split)
        self.tokenizer = load_tokenizer(cfg.model)
        self._check_store()
        self.ref_loss: np.ndarray | None = None
        # Online: the reference model scores each micro-batch (it must be the one the offline scores would
        # come from); stored scores are then not used at all, not even for the diagnostics.
        self.online = needs_reference(self.t) and cfg.scoring.mode == "online"
        if self.online and reference_model is None:
            raise UserError("scoring.mode=online needs the reference model (run through `slm run`)")
        self.reference_model = reference_model.to(self.acc.device) if self.online else None
        if needs_reference(self.t) and not self.online:
            self.ref_loss = load_scores(out, split, self.store, self.tokenizer)
        elif not self.online and (out / "scores" / split / "meta.json").is_file():  # diagnostics only
            with contextlib.suppress(UserError):
                self.ref_loss = load_scores(out, split, self.store, self.tokenizer)
        if self.t.method == "oracle" and self.store.noise_mask is None:
            raise UserError("method oracle needs a train split with a noise mask (data.noise_rate > 0)")
        model = load_model(cfg.model, vocab_size=len(self.tokenizer))
        self._check_model(model)
        # Compute-matched runs and data-parallel ranks must start from the same LoRA init, whatever the
        # process drew before; dropout then draws from the same seeded stream (restored on resume).
        torch.manual_seed(self.t.seed)
        self.model = (apply_lora(model, cfg.model) if cfg.model.lora else model).to(self.acc.device)
        if not cfg.model.lora:
            self.model.requires_grad_(True)
        params = list(_trainable(self.model).values())
        self.optimizer = torch.optim.AdamW(params, lr=self.t.lr, weight_decay=self.t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(self.t))
        self.order = BlockOrder(self.store.tokens.shape[0], self.t.seed)
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        if self.ref_loss is not None and not self._scores_cover_reads():
            if needs_reference(self.t):
                raise UserError("the score store lacks blocks this run reads (it was made with scoring.blocks=used "
                                "for a shorter grid or fewer processes): rerun `slm score` with scoring.blocks=all")
            self.ref_loss = None  # diagnostics only: better none than biased

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
        if meta.get("config_fingerprint") not in (None, config_fingerprint(self.cfg, self.split)):
            raise UserError(f"the token store in {self.store.path} was built from other data settings than "
                            "the config's: rerun `slm prepare` with this config")

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
                                                          torch.Tensor | None]]:
        """This rank's micro-batches of one optimizer step: (rows, input_ids, valid, noise, ref_loss)."""
        b, a, w = self.t.batch_size, self.t.grad_accum, self.world
        base = step * b * a * w
        for m in range(a):
            rows = np.sort(self.order.blocks(base + (m * w + self.rank) * b, b))  # sorted: faster memmap reads
            ids = torch.from_numpy(np.asarray(self.store.tokens[rows], dtype=np.int64))
            doc = torch.from_numpy(np.asarray(self.store.doc_ids[rows])) if self.cfg.data.doc_boundaries else None
            valid = valid_mask(ids, doc_ids=doc)
            noise = None
            if self.store.noise_mask is not None:
                noise = torch.from_numpy(np.asarray(self.store.noise_mask[rows], dtype=bool)).to(self.acc.device)
            ref = torch.from_numpy(np.asarray(self.ref_loss[rows])) if self.ref_loss is not None else None
            yield rows, ids.to(self.acc.device), valid.to(self.acc.device), noise, ref

    def _online_ref(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        from .scoring import model_token_losses

        return model_token_losses(self.reference_model, ids, valid, self.cfg.scoring.chunk_size)

    # ------------------------------------------------------------------ one step

    def _micro_stats(self, out: Any, ids: torch.Tensor, valid: torch.Tensor, noise: torch.Tensor | None,
                     ref: torch.Tensor | None) -> torch.Tensor:
        """One micro-batch's contribution to STAT_KEYS (summed over micro-batches and ranks)."""
        w = out.weights.double()
        zero = torch.zeros((), dtype=torch.float64, device=w.device)
        unsel = (valid & (out.weights == 0)).double()
        noise = noise if noise is not None else torch.zeros_like(valid)
        ref = torch.nan_to_num(ref.to(w.device).double()) if ref is not None else None
        values = {
            "loss_sum": out.loss_sum.detach(), "n_selected": out.n_selected, "n_valid": out.n_valid,
            "n_fed": torch.tensor(float(ids.numel()), device=w.device),
            "score_selected": torch.nan_to_num(out.score_selected) * out.n_selected,
            "score_unselected": torch.nan_to_num(out.score_unselected) * out.n_unselected,
            "n_unselected": out.n_unselected,
            "noise_selected": (w * (valid & noise)).sum(), "noise_valid": (valid & noise).sum(),
            "clean_selected": (w * (valid & ~noise)).sum(), "clean_valid": (valid & ~noise).sum(),
            "ref_selected": (w * ref).sum() if ref is not None else zero,
            "ref_selected_n": w.sum() if ref is not None else zero,
            "ref_unselected": (unsel * ref).sum() if ref is not None else zero,
            "ref_unselected_n": unsel.sum() if ref is not None else zero,
        }
        return torch.stack([values[k].double() for k in STAT_KEYS])

    def _step(self, step: int) -> dict[str, float]:
        """One optimizer step; returns the summed STAT_KEYS plus lr, grad norm and time."""
        start = time.perf_counter()
        self.model.train()
        stats = torch.zeros(len(STAT_KEYS), dtype=torch.float64, device=self.acc.device)
        for m, (rows, ids, valid, noise, ref) in enumerate(self._micro_batches(step)):
            if self.online:
                ref = self._online_ref(ids, valid)
            train_valid = valid & ~noise if self.t.method == "oracle" else valid
            # Seeded per (step, micro-batch): resumes draw the same tokens; `global` needs equal draws on all ranks.
            rank = 0 if self.t.scope == "global" else self.rank
            gen = torch.Generator().manual_seed(
                int(np.random.SeedSequence([self.t.seed, step, m, rank]).generate_state(1)[0])
            )
            try:
                with self.acc.autocast():
                    out = selective_lm_loss(
                        self.model, ids, train_valid, ref.to(ids.device) if ref is not None else None,
                        score_kind=self.score_kind, ratio=self.ratio, strategy=self.strategy, scope=self.t.scope,
                        generator=gen, temperature=self.t.temperature, soft=self.t.soft,
                        chunk_size=self.cfg.scoring.chunk_size,
                    )
            except ValueError:
                # Selection refuses non-finite own losses; when the weights caused them, say so.
                if all(torch.isfinite(p).all() for p in _trainable(self.model).values()):
                    raise
                raise NumericalError(f"step {step + 1}: the trainable weights are not finite; the last good "
                                     "checkpoint is kept (lower train.lr)") from None
            out.loss_sum.backward()
            stats += self._micro_stats(out, ids, valid, noise, ref)
            if step == 0 and m == 0 and self.acc.is_main_process:
                self._save_selection_sample(rows, ids, out.weights)
        params = list(_trainable(self.model).values())
        if self.world > 1:
            stats = self.acc.reduce(stats, reduction="sum")
            self._all_reduce_grads(params)
        result = dict(zip(STAT_KEYS, stats.tolist(), strict=True))
        for p in params:
            if p.grad is not None:
                p.grad.div_(max(result["n_selected"], 1.0))
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.t.max_grad_norm or float("inf"))
        if not math.isfinite(float(grad_norm)) or not math.isfinite(result["loss_sum"]):
            raise NumericalError(f"step {step + 1}: loss {result['loss_sum']} / grad norm {float(grad_norm)} is not "
                                 "finite; the last good checkpoint is kept (lower train.lr or check the data)")
        result.update(lr=self.scheduler.get_last_lr()[0], grad_norm=float(grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        result["step_s"] = time.perf_counter() - start
        return result

    def _save_selection_sample(self, rows: np.ndarray, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """The first micro-batch's selection: the same blocks in every run, for the highlight page."""
        path = self.run_dir / "selection_sample.npz"
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, rows=rows, tokens=ids.cpu().numpy(), weights=weights.float().cpu().numpy())

    @staticmethod
    def _all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, step: int, state: dict[str, Any]) -> None:
        ckpt_root = self.run_dir / "checkpoints"
        with atomic_dir(ckpt_root / f"step-{step:06d}") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in _trainable(self.model).items()},
                      tmp / "trainable.safetensors")
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save({"cpu": torch.get_rng_state()}, tmp / "rng.pt")
            write_json(tmp / "state.json", {**state, "step": step})
        for old in ckpt_root.glob("step-*"):  # keep only the newest full checkpoint
            if old.name != f"step-{step:06d}":
                shutil.rmtree(old, ignore_errors=True)

    def _latest_checkpoint(self) -> Path | None:
        found = sorted((self.run_dir / "checkpoints").glob("step-[0-9]*"))
        return found[-1] if found else None

    def _load_checkpoint(self, path: Path) -> dict[str, Any]:
        weights = load_file(path / "trainable.safetensors")
        params = _trainable(self.model)
        if set(weights) != set(params):
            raise UserError(f"checkpoint {path} does not match this run's model: delete {self.run_dir} to restart")
        with torch.no_grad():
            for k, v in weights.items():
                params[k].copy_(v)
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["cpu"])
        return json.loads((path / "state.json").read_text())

    def _snapshot(self, step: int) -> None:
        """Trainable weights only, for the paper's trajectory analysis."""
        path = self.run_dir / "checkpoints" / "trajectory" / f"step-{step:06d}.safetensors"
        with atomic_path(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in _trainable(self.model).items()}, str(tmp))

    def _remove_partial_writes(self) -> None:
        """Temp files and dirs (`.<name>.*.tmp`) of atomic writes that a kill cut off: never complete, never read."""
        for tmp in sorted(self.run_dir.rglob(".*.tmp")) if self.run_dir.is_dir() else []:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ the loop

    def _config_hash(self) -> str:
        """What the run's result depends on: data, model, training, and the reference behind its scores."""
        ref = reference_digest(self.out) if needs_reference(self.t) else None
        # Fields that change how a run is stored or named, not what it learns, stay out of the hash.
        t = self.t.model_dump(exclude={"name", "checkpoint_every", "merge"})
        return fingerprint(self.cfg.data.model_dump(), self.cfg.model.model_dump(), t, ref)

    def _check_existing(self, config_hash: str, replace_stale: bool) -> dict[str, Any] | None:
        """The finished summary when the run is done; clears (or refuses) a run dir of another config."""
        summary_path, ckpt = self.run_dir / "train.json", self._latest_checkpoint()
        found = None
        if summary_path.is_file():
            found = read_json(summary_path).get("config_hash")
        elif ckpt is not None:
            found = read_json(ckpt / "state.json").get("config_hash")
        if found is None or found == config_hash:  # a checkpoint without train.json: resume it
            return read_json(summary_path) if summary_path.is_file() else None
        if not replace_stale:
            raise UserError(f"{self.run_dir} holds a run of another config: set train.name or delete that directory")
        if self.acc.is_main_process:
            shutil.rmtree(self.run_dir)
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
                                 "diag": dict.fromkeys(DIAG_KEYS, 0.0)}
        ckpt = self._latest_checkpoint()
        if ckpt is not None:
            state = self._load_checkpoint(ckpt)
        elif main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.run_dir / "config.yaml", self.cfg.to_yaml())
            if self.t.snapshot_every:
                self._snapshot(0)
        log_path = self.run_dir / "log.jsonl"
        if main:  # drop log lines past the checkpoint we resume from (and a line a kill cut short)
            kept = [r for r in _read_log(log_path) if r["step"] <= state["step"]]
            write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept))
        # TensorBoard hides the events a killed run logged past the checkpoint (purge_step).
        self.acc.init_trackers("tb", init_kwargs={"tensorboard": {"purge_step": state["step"] + 1}})
        bar = tqdm(total=self.t.steps, initial=state["step"], desc=f"train {self.name}", disable=not main,
                   unit="step", dynamic_ncols=True)
        try:
            with open(log_path, "a") if main else contextlib.nullcontext() as log:
                for step in range(state["step"], self.t.steps):
                    rng = torch.get_rng_state()
                    try:
                        sums = self._step(step)
                    except KeyboardInterrupt:
                        if main and state["step"] > 0:  # resume from the last finished step, with its RNG
                            torch.set_rng_state(rng)
                            self._save_checkpoint(state["step"], state)
                        raise
                    record = self._advance(state, sums)
                    self.acc.log({k: v for k, v in record.items() if k != "step" and v is not None},
                                 step=record["step"])
                    if main:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                        bar.set_postfix(loss=f"{record['loss']:.3f}", sel=f"{record['selected_frac']:.2f}")
                        bar.update(1)
                        if self.t.snapshot_every and (step + 1) % self.t.snapshot_every == 0:
                            self._snapshot(step + 1)
                        if self.t.checkpoint_every and (step + 1) % self.t.checkpoint_every == 0:
                            self._save_checkpoint(step + 1, state)
        finally:
            bar.close()
            for tracker in self.acc.trackers:  # not acc.end_training(): that would end the process group too
                tracker.finish()
        if not main:
            return {}
        self._save_checkpoint(self.t.steps, state)
        self._save_final()
        last = _read_log(log_path)[-1]
        summary = {
            "name": self.name, "method": self.t.method, "strategy": self.strategy, "score": self.score_kind,
            "ratio": self.ratio, "scope": self.t.scope, "seed": self.t.seed, "steps": state["step"],
            "tokens_seen": state["tokens_seen"], "tokens_trained": state["tokens_trained"],
            "train_loss_final": last["loss"], "selection": selection_diagnostics(state["diag"]),
            "config_hash": config_hash, "version": __version__,
        }
        write_json(self.run_dir / "train.json", summary)
        return summary

    @staticmethod
    def _advance(state: dict[str, Any], sums: dict[str, float]) -> dict[str, Any]:
        """Fold one step's sums into the run state; return the step's log record."""
        state["step"] += 1
        state["tokens_seen"] += int(sums["n_fed"])
        state["tokens_trained"] += int(round(sums["n_selected"]))
        for k in DIAG_KEYS:
            state["diag"][k] += sums[k]
        n_sel = sums["n_selected"]
        return {
            "step": state["step"], "tokens_seen": state["tokens_seen"], "tokens_trained": state["tokens_trained"],
            "loss": sums["loss_sum"] / max(n_sel, 1.0), "selected_frac": n_sel / max(sums["n_valid"], 1.0),
            "score_selected": _ratio(sums["score_selected"], n_sel),
            "score_unselected": _ratio(sums["score_unselected"], sums["n_unselected"]),
            "lr": sums["lr"], "grad_norm": sums["grad_norm"], "step_s": sums["step_s"],
        }

    def _save_final(self) -> None:
        if self.cfg.model.lora:
            with atomic_dir(self.run_dir / "adapter") as tmp:
                self.model.save_pretrained(tmp)
            if self.t.merge:
                with atomic_dir(self.run_dir / "merged") as tmp:
                    self.model.merge_and_unload().save_pretrained(tmp)
                    self.tokenizer.save_pretrained(tmp)
        else:
            with atomic_dir(self.run_dir / "model") as tmp:
                self.model.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)


def _read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a log.jsonl; a last line cut short by a kill is dropped."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def selection_diagnostics(diag: dict[str, float]) -> dict[str, float | None]:
    """Share of injected-noise and of clean target tokens selected (weighted if soft), and the mean
    reference loss of selected and unselected tokens over the whole run (None where undefined)."""
    return {
        "noise_selected_frac": _ratio(diag["noise_selected"], diag["noise_valid"]),
        "clean_selected_frac": _ratio(diag["clean_selected"], diag["clean_valid"]),
        "ref_loss_selected": _ratio(diag["ref_selected"], diag["ref_selected_n"]),
        "ref_loss_unselected": _ratio(diag["ref_unselected"], diag["ref_unselected_n"]),
    }


def train(cfg: Config, out: Path, name: str | None = None, *, split: str = "train", run_dir: Path | None = None,
          reference_model: Any = None, replace_stale: bool = False) -> dict[str, Any]:
    """Run (or resume, or return the finished summary of) one training run under `out/runs/<name>`.

    A run dir holding another config's run is an error, or is cleared when `replace_stale`
    (what `slm run` does when a changed config invalidates a run).
    """
    return Trainer(cfg, out, name, split=split, run_dir=run_dir, reference_model=reference_model).fit(replace_stale)
