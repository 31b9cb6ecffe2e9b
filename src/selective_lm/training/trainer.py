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

Engines (engine.py): the model is wrapped in `loss.SelectiveLM`, whose forward returns the selective
loss, so DDP and FSDP2 see an ordinary forward/backward; its decoder layers are compiled on CUDA
(`train.compile`), and one forward carries `train.micro_batch_size / train.batch_size` selection
units of `train.batch_size` rows each, every unit selecting with its own draws as when it was a
forward of its own: the micro-batch split changes the speed, not the run. Checkpoints
(checkpoint.py) gather the trainable weights and the optimizer state in full, so a run resumes on
any number of processes. Data parallel runs start from identical weights because LoRA's random
init is seeded by `train.seed` (as is the global RNG that dropout draws from); launch them with
`accelerate launch --multi_gpu --num_processes N` (on CPU too: accelerate's `--cpu` with N > 1
needs MPI and otherwise starts one process).

Host work per optimizer step: batches go to the GPU pinned and asynchronously, the statistics and
the gradient norm come back in one transfer (the step's one host sync: the loss path has none),
and the model is put back in train mode only after a learning-curve point or a self-reference pass.

`slm train` and `slm reference` both run it; it imports no stage. Metrics: `log.jsonl` on rank 0,
and the same scalars through accelerate's trackers when `train.report_to` names any (TensorBoard: `runs/<name>/tb/`).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..analysis import selection as diag
from ..config import Config, TrainConfig, leaves
from ..errors import UserError
from ..files import fingerprint, read_json, write_json, write_text
from ..method.loss import SelectiveLM, SelectiveLoss, forward_hidden
from ..method.registry import METHODS, OBJECTIVES
from ..method.selection import trainable_mask
from ..method.spec import Selection
from ..store.blocks import BlockOrder, HalfScores
from ..store.frozen import frozen_model, model_token_losses
from ..store.layout import OutDir, RunDir, TokenStore
from ..store.outconfig import differences
from . import runstats
from .checkpoint import Checkpoints, latest_checkpoint, rng_state, set_rng_state, trainable
from .curve import LearningCurve
from .engine import Engine, free_memory, to_device
from .models import check_store, load_reference_model, load_tokenizer, student_model, tokenizer_fingerprint
from .selfref import SelfReference, check_fits


class NumericalError(UserError):
    """A non-finite loss or gradient: the run stops, its last checkpoint stays the good one."""


class MicroBatch(NamedTuple):
    """One forward's rows (whole selection units) and what the step reads of them, on the device."""

    rows: np.ndarray
    ids: torch.Tensor
    valid: torch.Tensor
    noise: torch.Tensor | None
    kinds: torch.Tensor | None
    ref: torch.Tensor | None
    units: list[int]  # the selection units' positions in the step (each keys its own random draws)
    docs: torch.Tensor | None = None  # doc ids (per-document counts), on the train split


def _lr_lambda(cfg: TrainConfig):
    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


class Trainer:
    """Holds one run's state; `fit()` runs or resumes it. Validates everything before writing. With `build=False`
    the models, optimizer and checkpoints wait for `fit()` to need them: a finished run is confirmed without."""

    def __init__(self, cfg: Config, out: OutDir, run: RunDir, *, split: str = "train",
                 reference_model: Any = None, build: bool = True) -> None:
        self.cfg, self.t, self.out, self.run = cfg, cfg.train, out, run
        self.name = run.name
        self.selection = self.t.selection()
        self.rule = self.selection.rule_used
        self.method = METHODS[self.t.method]
        self.objective = OBJECTIVES[self.method.objective]
        self.objective_params = cfg.objective_params()
        self.engine = Engine(self.t, str(self.run.path))
        self.acc, self.device = self.engine.acc, self.engine.device
        self.split = split
        self.store: TokenStore = out.store(split)
        self.tokenizer = load_tokenizer(cfg.model)
        check_store(self.store, cfg, split, self.tokenizer)
        self.ref_loss: np.ndarray | HalfScores | None = None
        # A self-reference (reference.mode ema/checkpoint) is the student's own earlier weights (selfref.py);
        # every selecting run, controls included, trains every token for its first reference.start_step steps.
        own_reference = cfg.reference.is_self and split == "train"
        self.warmup = cfg.reference.start_step if own_reference and self.method.role != "baseline" else 0
        # Online: the reference model scores each micro-batch (it must be the one the offline scores would
        # come from); stored scores are then not used at all, not even for the diagnostics.
        self.online = self.t.needs_reference() and cfg.scoring.mode == "online" and not own_reference
        if self.online and reference_model is None:
            raise UserError("scoring.mode=online needs the reference model (run through `slm run`)")
        # An objective or score kind that reads the reference's next-token distribution (distillation) runs the
        # reference model online, in the step: its hidden states go to the objective (`loss.Batch.reference`).
        self.reference_logits = "reference_logits" in self.selection.needs
        self.own_reference = own_reference
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
        if self.method.oracle and self.store.noise_mask is None:
            raise UserError(f"method {self.t.method} needs a train split with a noise mask (data.noise_rate > 0)")
        self.world, self.rank = self.engine.world, self.engine.rank
        self.order = BlockOrder(self.store.tokens.shape[0], self.t.seed)
        self.kind_names: list[str] = self.store.kind_names
        # Labelled documents (CHAMP's wrong steps): per-document selection counts, for a bootstrap over documents.
        labelled = self.store.noise_kind is not None and set(diag.WRONG_STEP) <= set(self.kind_names)
        self.slots = torch.tensor(self.store.wrong_step_docs if labelled else [], dtype=torch.long, device=self.device)
        self.slot_kinds = [self.kind_names.index(k) for k in diag.WRONG_STEP] if labelled else []
        # Each training document's trained share (the report's document table); none on the reference's split.
        self.doc_totals = runstats.DocTotals(self.store.meta.get("n_docs", 0) if split == "train" else 0, self.device)
        # The learning curve's fixed subsets (students only): the same blocks for every run and step.
        self.curve = LearningCurve(cfg, out) if split == "train" and cfg.eval.every else None
        if self.ref_loss is not None and not self._scores_cover_reads():
            if self.t.needs_reference():
                raise UserError("the score store is partial: it lacks blocks this run reads (it was made with "
                                "scoring.blocks=used for a shorter grid or fewer processes): rerun `slm score` with "
                                "scoring.blocks=all")
            self.ref_loss = None  # diagnostics only: better none than biased
        self.units = 1  # selection units per forward: sized in fit(), on the run's own first batches
        self._reference_given, self.built = reference_model, False
        if build:
            self._build()

    def _build(self) -> None:
        """The reference model a step runs, the student, its optimizer and checkpoints."""
        cfg, reference_model = self.cfg, self._reference_given
        if self.reference_logits and reference_model is None:
            reference_model = load_reference_model(cfg, self.out)
        self.reference_model = frozen_model(reference_model, self.device, self.engine.bf16) \
            if self.online or self.reference_logits else None
        self.model = student_model(cfg, self.tokenizer, self.device)
        self.module = self.engine.wrap(SelectiveLM(self.model))
        self.weights = list(trainable(self.model).values())  # after wrapping: FSDP turns them into shards
        self.self_ref: SelfReference | None = None
        if self.own_reference and self.t.needs_reference():
            r, weights = cfg.reference, trainable(self.model)
            check_fits(weights, r.mode, self.device, free_memory(self.device))
            self.self_ref = SelfReference(weights, r.mode, r.ema_decay, r.checkpoint_step)
        self.optimizer = self.engine.optimizer(self.weights, self.t.lr, self.t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(self.t))
        self.checkpoints = Checkpoints(self.run, self.module, self.model, self.optimizer, self.scheduler,
                                       self.self_ref, self.engine.main)
        self.built = True

    def _scores_cover_reads(self) -> bool:
        """Whether every block this run reads has reference losses (stores scored with blocks=used)."""
        rows = np.unique(self.order.blocks(0, self.t.steps * self.t.batch_size * self.t.grad_accum * self.world))
        return not np.isnan(np.asarray(self.ref_loss[rows])[:, 1:]).any()

    # ------------------------------------------------------------------ data

    def _micro_batch(self, rows: np.ndarray, units: list[int]) -> MicroBatch:
        store, device = self.store, self.device
        noise = kinds = ref = None
        if store.noise_mask is not None:
            noise = to_device(store.noise_mask[rows], device, bool)
        if store.noise_kind is not None:
            kinds = to_device(store.noise_kind[rows], device)
        if self.ref_loss is not None:
            ref = to_device(self.ref_loss[rows], device)
        valid = to_device(store.targets(rows, self.cfg.data.doc_boundaries), device)  # no prompt tokens
        docs = to_device(store.doc_ids[rows], device) if len(self.slots) or self.doc_totals.enabled else None
        # One copy: the int32 memmap rows straight into the int64 ids the embedding needs.
        return MicroBatch(rows, to_device(store.tokens[rows], device, np.int64), valid, noise, kinds, ref, units, docs)

    def micro_batches(self, step: int) -> Iterator[MicroBatch]:
        """This rank's forwards of one optimizer step, `self.units` selection units of `train.batch_size` rows each."""
        b, a, w = self.t.batch_size, self.t.grad_accum, self.world
        base = step * b * a * w
        for first in range(0, a, self.units):
            units = list(range(first, first + self.units))
            # Stream order, not sorted: a token's random draw then depends on its global batch position only,
            # so data parallel equals one process for every strategy.
            rows = np.concatenate([self.order.blocks(base + (m * w + self.rank) * b, b) for m in units])
            yield self._micro_batch(rows, units)

    def _online_ref(self, mb: MicroBatch) -> torch.Tensor:
        if self.self_ref is None:
            return model_token_losses(self.reference_model, mb.ids, mb.valid, self.cfg.scoring.chunk_size)
        # The student's forward with the reference's weights swapped in, in eval mode (no dropout draws). FSDP
        # keeps the root's gathered weights after a forward: reshard so that each forward gathers the swapped ones.
        self.model.eval()
        self.engine.reshard()
        with self.self_ref.swapped_in(), self.engine.autocast():
            losses = self.module(mb.ids, mb.valid, losses_only=True, chunk_size=self.cfg.scoring.chunk_size)["losses"]
            self.engine.reshard()
        self.model.train()
        return losses

    def _reference_side(self, mb: MicroBatch) -> tuple[torch.Tensor, torch.nn.Module] | None:
        """The reference's final hidden states of the micro-batch (no grad) and its head, when the objective or the
        score kind reads its next-token distribution."""
        if not self.reference_logits:
            return None
        with torch.no_grad():
            return forward_hidden(self.reference_model, mb.ids)

    def step_selection(self, step: int) -> Selection:
        """The step's selection: the run's, or every token during a self-reference's warm-up."""
        return self.selection.every_token() if step < self.warmup else self.selection

    # ------------------------------------------------------------------ one step

    def _micro_stats(self, out: SelectiveLoss, mb: MicroBatch, ref: torch.Tensor | None) -> torch.Tensor:
        """One micro-batch's contribution to the step's sums (runstats.py), summed over micro-batches and ranks."""
        return runstats.micro_stats(out, mb.ids.numel(), mb.valid, mb.noise, mb.kinds, ref, mb.docs, self.slots,
                                    self.slot_kinds, ce_only=self.objective.logs_ce)

    def reference_losses(self, mb: MicroBatch, selection: Selection) -> torch.Tensor | None:
        """The reference's losses of the micro-batch `[B, T]`: stored ones, or the online or self-reference's when
        the run scores online and its score kind reads them."""
        if (self.online or self.self_ref is not None) and selection.needs_reference:
            return self._online_ref(mb)
        return mb.ref

    def forward_backward(self, step: int, mb: MicroBatch, selection: Selection,
                         sync: bool) -> tuple[SelectiveLoss, torch.Tensor | None]:
        """One micro-batch of the step: its reference losses, then score → select → loss under the run's objective
        inside the wrapped module's forward (DDP and FSDP see the loss made in a forward: `loss.SelectiveLM`),
        then backward. Returns the loss's counts and the reference losses it selected by."""
        ref = self.reference_losses(mb, selection)
        valid = trainable_mask(mb.valid, mb.noise, oracle=self.method.oracle)
        generators = [self.generator(step, m) for m in mb.units]
        # Non-finite losses make loss_sum NaN (no host sync here): `step` stops at its one read of the sums.
        with self.engine.grad_sync(sync), self.engine.autocast():
            out = SelectiveLoss(**self.module(
                mb.ids, valid, ref, selection=selection, generator=generators, units=len(mb.units),
                chunk_size=self.cfg.scoring.chunk_size, reference=self._reference_side(mb),
                params=self.objective_params))
            out.loss_sum.backward()
        return out, ref

    def step(self, step: int) -> dict[str, float]:
        """One optimizer step: each micro-batch's forward and backward (`forward_backward`), the sums over
        micro-batches and ranks, the gradients scaled to the mean over the step's trained tokens and clipped,
        the optimizer's step. Returns the summed STAT_KEYS plus lr, grad norm and time (one host sync)."""
        start = time.perf_counter()
        stats = torch.zeros(runstats.size(len(self.slots), len(self.slot_kinds)), dtype=torch.float64,
                            device=self.device)
        selection = self.step_selection(step)
        n_forwards = self.t.grad_accum // self.units
        for i, mb in enumerate(self.micro_batches(step)):
            out, ref = self.forward_backward(step, mb, selection, sync=i == n_forwards - 1)
            stats += self._micro_stats(out, mb, ref)
            self.doc_totals.add(out.weights, mb.valid, mb.docs)
            if step == 0 and i == 0 and self.engine.main:  # the first unit only, whatever the micro-batch size
                b = self.t.batch_size
                runstats.save_sample(self.run.selection_sample, mb.rows[:b], mb.ids[:b], out.weights[:b])
        stats = self.engine.reduce(stats)
        norm = self.engine.finish_gradients(self.weights, stats[runstats.STAT_KEYS.index("n_selected")],
                                            self.t.max_grad_norm)
        *values, grad_norm = torch.cat([stats, norm.reshape(1)]).tolist()  # the step's one host sync
        result = runstats.unpack(values)
        if not math.isfinite(grad_norm) or not math.isfinite(result["loss_sum"]):
            raise NumericalError(f"step {step + 1}: loss {result['loss_sum']} / grad norm {grad_norm} is not "
                                 "finite; the last good checkpoint is kept (lower train.lr or check the data)")
        self.doc_totals.commit()
        result.update(lr=self.scheduler.get_last_lr()[0], grad_norm=grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.self_ref is not None:
            self.self_ref.after_step(step + 1)
        result["step_s"] = time.perf_counter() - start
        return result

    def generator(self, step: int, m: int) -> torch.Generator:
        """The selection's random draws for selection unit `m` of `step`.

        Keyed by the run's identity (method, ratio, seed), so that random and stochastic runs, or two
        ratios, are independent controls; `train.common_random=true` drops method and ratio from the
        key (common random numbers: random-r0.3 then selects a subset of random-r0.5). Keyed by the
        unit's global position, so resumes draw the same tokens, data parallel equals one process and
        any micro-batch size equals one unit per forward; `global` scope gathers all ranks' unit m and
        must draw the same on each.
        """
        position = m if self.t.scope == "global" else m * self.world + self.rank
        key = [self.t.seed, step, position]
        if not self.t.common_random:  # a threshold rule's runs are keyed by their rule (their ratio is 1)
            run = (self.t.method, self.rule.ratio) if self.t.rule == "topk" else (self.t.method, self.t.rule,
                                                                                  self.rule.threshold)
            key.append(int(fingerprint(*run), 16))
        return torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))

    # ------------------------------------------------------------------ sizing

    def _size_micro_batches(self) -> None:
        """`train.micro_batch_size` and the curve's `eval.batch_size`, resolved on this device (engine.py)."""
        key = {"model": self.cfg.model.name, "lora": self.cfg.model.lora, "block_len": self.cfg.data.block_len,
               "gradient_checkpointing": self.t.gradient_checkpointing, "world": self.world,
               "parallel": self.t.parallel}
        self.units = self.engine.micro_units(self._probe_units, {**key, "kind": "train"})
        if self.curve:
            self.curve.size(self.engine, self.module, key)

    def _probe_units(self, units: int) -> None:
        """A forward and backward of `units` selection units (the run's first rows), leaving no trace behind."""
        b = self.t.batch_size
        rows = np.concatenate([self.order.blocks(m * b, b) for m in range(units)])
        mb = self._micro_batch(rows, list(range(units)))
        rng = torch.cuda.get_rng_state(self.device)
        try:
            self.forward_backward(0, mb, self.selection, sync=True)
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.set_rng_state(rng, self.device)

    # ------------------------------------------------------------------ the loop

    def _config_hash(self) -> str:
        """What the run's result depends on: data, model, training, and the reference behind its scores."""
        # A run that reads stored scores, if only for its diagnostics, depends on the reference behind them.
        uses_ref = self.t.needs_reference() or self.ref_loss is not None or self.reference_logits
        ref = self.out.reference_digest() if uses_ref else None
        if self.warmup:  # a self-reference: its settings, for every selecting run (each has the warm-up)
            ref = self.cfg.reference.model_dump(include={"mode", "ema_decay", "start_step", "checkpoint_step"})
        elif uses_ref and self.cfg.scoring.dtype != "float32":  # rounded scores select (slightly) differently;
            ref = (ref, self.cfg.scoring.dtype)  # float32 keeps the plain digest, so earlier runs stay valid
        # Fields that change how a run is stored or named, not what it learns, stay out of the hash.
        t = self.t.hashed(exclude={"name", *TrainConfig.ENGINE_FIELDS})
        if self.objective_params is not None and (keys := self.objective_params.model_dump(exclude_defaults=True)):
            t["objective"] = keys  # only away from the defaults: a run at the defaults keeps its earlier hash
        curve = self.cfg.eval.model_dump(include={"splits", "every", "curve_tokens"}) if self.curve else None
        # The store's content too: the code that packs it may change while the data settings do not.
        # Every process reads its own batch_size x grad_accum blocks per step: the process count is part of the run
        # (left out for one process, so runs made before it was recorded keep their hash).
        world = [self.world] if self.world > 1 else []
        return fingerprint(self.cfg.data.hashed(), self.store.fingerprint, self.cfg.model.model_dump(), t, ref,
                           curve, *world)

    def _check_existing(self, config_hash: str, replace_stale: bool) -> dict[str, Any] | None:
        """The finished summary when the run is done; clears (or refuses) a run dir of another config."""
        summary_path, ckpt = self.run.summary_path, latest_checkpoint(self.run)
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
        if self.engine.main:  # never deleted: moved aside, with a line saying where
            aside = self.out.stale_dir(self.run.path)
            aside.parent.mkdir(parents=True, exist_ok=True)
            self.run.path.rename(aside)
            print(f"slm: {self.run.path} held a run of another config ({what}); moved it to {aside}", file=sys.stderr)
        self.acc.wait_for_everyone()
        return None

    def fit(self, replace_stale: bool = False) -> dict[str, Any]:
        config_hash = self._config_hash()
        summary = self.run.summary_path
        if not self.built and not (summary.is_file() and read_json(summary).get("config_hash") == config_hash):
            self._build()  # checked, like everything else, before a stale run is moved aside
        done = self._check_existing(config_hash, replace_stale)
        if done is not None:
            return done
        main = self.engine.main
        if main:
            self.checkpoints.remove_partial_writes()
        self._size_micro_batches()
        self.model.train()  # from_pretrained gives eval mode; only a curve point or a self-reference pass leaves it
        state: dict[str, Any] = {"step": 0, "tokens_seen": 0, "tokens_trained": 0, "config_hash": config_hash,
                                 "diag": dict.fromkeys(diag.FIELDS, 0.0)}
        ckpt = self.checkpoints.latest()
        if ckpt is not None:
            state = self.checkpoints.load(ckpt)
            self.doc_totals.load(state, main)
        else:
            if main:
                self.run.path.mkdir(parents=True, exist_ok=True)
                write_text(self.run.config_path, self.cfg.to_yaml())
            self.acc.wait_for_everyone()
            if self.t.snapshot_every:
                self.checkpoints.snapshot(0)
        log_path, curve_path = self.run.log_path, self.run.curve_path
        first_point = None
        if self.curve and state["step"] == 0:
            first_point = self.curve.point(self.engine, self.module, self.model, 0, 0)
        if main:  # drop records past the checkpoint we resume from (and a line a kill cut short)
            for path, records in ((log_path, self.run.log()), (curve_path, self.run.curve())):
                kept = [r for r in records if r["step"] <= state["step"]]
                write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
            if first_point is not None:
                write_text(curve_path, json.dumps(first_point) + "\n")
        self.engine.start_trackers(self.out.root.resolve().name, self.name, state["step"] + 1,
                                   leaves(self.cfg.model_dump(mode="json")))
        bar = tqdm(total=self.t.steps, initial=state["step"], desc=f"train {self.name}", disable=not main,
                   unit="step", dynamic_ncols=True)
        try:
            with open(log_path, "a") if main else contextlib.nullcontext() as log, \
                    open(curve_path, "a") if main else contextlib.nullcontext() as curve:
                for step in range(state["step"], self.t.steps):
                    rng = rng_state()
                    try:
                        sums = self.step(step)
                    except KeyboardInterrupt:
                        # Resume from the last finished step, with its RNG; with several processes a collective
                        # after an interrupt could hang, so those resume from the last periodic checkpoint.
                        if self.world == 1 and state["step"] > 0:
                            set_rng_state(rng)
                            self.checkpoints.save(state["step"], self.doc_totals.into(state, self.engine.reduce))
                        raise
                    record = self.advance(state, sums)
                    scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
                    scalars |= {f"selected_by_kind/{k}": v for k, v in record["selected_by_kind"].items()}
                    self.acc.log(scalars, step=record["step"])
                    if main:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                        bar.set_postfix(loss=f"{record['loss'] or 0:.3f}", sel=f"{record['selected_frac']:.2f}")
                        bar.update(1)
                    if self.curve and ((step + 1) % self.cfg.eval.every == 0 or step + 1 == self.t.steps):
                        point = self.curve.point(self.engine, self.module, self.model, step + 1, state["tokens_seen"])
                        if main:
                            curve.write(json.dumps(point) + "\n")
                            curve.flush()
                    if self.t.snapshot_every and (step + 1) % self.t.snapshot_every == 0:
                        self.checkpoints.snapshot(step + 1)
                    if self.t.checkpoint_every and (step + 1) % self.t.checkpoint_every == 0:
                        self.checkpoints.save(step + 1, self.doc_totals.into(state, self.engine.reduce))
        finally:
            bar.close()
            for tracker in self.acc.trackers:  # not acc.end_training(): that would end the process group too
                tracker.finish()
        self.checkpoints.save(self.t.steps, self.doc_totals.into(state, self.engine.reduce))
        self.checkpoints.save_final(self.tokenizer, self.cfg.model, self.t.merge)
        if not main:
            return {}
        self.doc_totals.save(self.run.doc_selection, state)
        last = self.run.log()[-1]
        summary = {
            "name": self.name, "method": self.t.method, "strategy": self.rule.strategy, "score": self.rule.score,
            "ratio": self.rule.ratio if self.rule.threshold is None else None, "rule": self.t.rule,
            "threshold": self.rule.threshold, "scope": self.t.scope, "seed": self.t.seed, "steps": state["step"],
            "tokens_seen": state["tokens_seen"], "tokens_trained": state["tokens_trained"],
            "selected_share": runstats.ratio(state["tokens_trained"], state.get("tokens_valid", 0)),
            "train_loss_final": last["loss"],
            "selection": runstats.selection_summary(state, self.kind_names, self.slots.tolist()),
            "engine": {"device": str(self.device), "bf16": self.engine.bf16, "compiled_layers": self.engine.compiled,
                       "micro_batch_size": self.units * self.t.batch_size},  # how it ran, not what it learned
            "config_hash": config_hash, "processes": self.world, "version": __version__,
        }
        write_json(self.run.summary_path, summary)
        return summary

    def advance(self, state: dict[str, Any], sums: dict[str, Any]) -> dict[str, Any]:
        """Fold one step's sums into the run state; return the step's log record (runstats.py)."""
        return runstats.advance(state, sums, self.kind_names)
