"""The engine (engine.py): micro-batch sizing, compile, host syncs, batch-size probing.

The engine settings change how a run is computed, never what it learns: these tests train the same
run under different settings and compare the logs and weights. GPU-only checks are in test_gpu.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers.runs import assert_same_run, smoke_train
from selective_lm.config import load_config
from selective_lm.store.layout import OutDir
from selective_lm.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [("train.method=topk",), ("train.method=random",),
                                   ("train.method=stochastic", "train.scope=sequence")])
def test_every_micro_batch_split_is_the_same_run(smoke_out: Path, extra: tuple[str, ...]) -> None:
    """4 selection units per step, carried 1, 2 or 4 per forward: the same selections, losses and weights (up to
    the float noise of forwards of 4, 8 or 16 rows: helpers/runs.py)."""
    common = ("train.ratio=0.5", "train.grad_accum=4", "train.steps=3", "eval.every=0", *extra)
    for rows in (4, 8, 16):
        assert smoke_train(smoke_out, *common, f"train.micro_batch_size={rows}", f"train.name=m{rows}") == 0
        summary = json.loads((smoke_out / "runs" / f"m{rows}" / "train.json").read_text())
        assert summary["engine"] == {"device": "cpu", "bf16": False, "compiled_layers": 0, "micro_batch_size": rows}
    cfg = load_config("smoke", overrides=list(common))
    trainer = Trainer(cfg, OutDir(smoke_out), OutDir(smoke_out).run("m4"))
    for other in ("m8", "m16"):
        assert_same_run(smoke_out, "m4", other, cfg, generator=lambda: trainer.generator(0, 0))


@pytest.mark.parametrize("rows", ["3", "12"])
def test_a_micro_batch_of_partial_units_is_refused(smoke_out: Path, capsys, rows: str) -> None:
    """3 is no multiple of the 4-row selection unit; 12 = 3 units does not divide the 4 of the step."""
    capsys.readouterr()
    assert smoke_train(smoke_out, "train.grad_accum=4", f"train.micro_batch_size={rows}") == 2
    err = capsys.readouterr().err
    assert "train.micro_batch_size" in err and "Traceback" not in err and not (smoke_out / "runs").exists()


def test_engine_settings_stay_out_of_the_run_hash(smoke_out: Path) -> None:
    """A finished run is found done under another micro-batch size or compile setting (they change no result)."""
    common = ("train.grad_accum=2", "train.steps=2", "eval.every=0")
    assert smoke_train(smoke_out, *common, "train.micro_batch_size=4") == 0
    log = smoke_out / "runs" / "clm" / "log.jsonl"
    before = log.stat().st_mtime_ns
    assert smoke_train(smoke_out, *common, "train.micro_batch_size=8", "train.compile=true") == 0
    assert log.stat().st_mtime_ns == before


def test_compile_wraps_every_decoder_layer_once() -> None:
    from selective_lm.training.engine import compile_layers, decoder_layers
    from selective_lm.training.models import apply_lora, load_model

    cfg = load_config("smoke")
    model = apply_lora(load_model(cfg.model), cfg.model)
    layers = decoder_layers(model)
    assert len(layers) == model.get_base_model().config.num_hidden_layers == compile_layers(model)
    assert all(layer._compiled_call_impl is not None for layer in layers)


def test_probe_takes_the_largest_size_that_fits_and_remembers_it(tmp_path: Path, monkeypatch) -> None:
    from selective_lm.training import engine

    monkeypatch.setenv("SLM_CACHE", str(tmp_path))
    monkeypatch.setattr(engine, "_memory_key", lambda device: "fake-gpu|80GB")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    tried: list[int] = []

    def try_size(n: int) -> None:
        tried.append(n)
        if n > 4:
            raise torch.cuda.OutOfMemoryError("out of memory")

    key = {"model": "m", "block_len": 128}
    assert engine.probe_rows(try_size, [1, 2, 4, 8, 16], key, torch.device("cuda")) == 4
    assert tried == [1, 2, 4, 8]
    assert engine.probe_rows(try_size, [1, 2, 4, 8, 16], key, torch.device("cuda")) == 4
    assert tried == [1, 2, 4, 8]  # remembered: not probed again
    assert engine.probe_rows(try_size, [1, 2], {**key, "block_len": 256}, torch.device("cuda")) == 2


def test_auto_sizes_are_the_configured_ones_on_cpu() -> None:
    from selective_lm.training.engine import frozen_batch_size

    def never(n: int) -> None:
        raise AssertionError("no probe on CPU")

    assert frozen_batch_size("auto", 8, never, {}, torch.device("cpu"), 1000) == 8
    assert frozen_batch_size(32, 8, never, {}, torch.device("cpu"), 1000) == 32


# ----------------------------------------------------------------------------- host syncs (bench case overhead)


def _overhead(tmp_path: Path) -> dict[str, Any]:
    from selective_lm.bench import overhead

    cfg = load_config("smoke", overrides=["bench.steps=2", "bench.warmup=0", "bench.overhead_accum=3"])
    return overhead(cfg, OutDir.of(tmp_path))


@pytest.mark.slow
def test_overhead_case_counts_one_sync_per_step_and_catches_one_more_per_micro_batch(tmp_path: Path,
                                                                                       monkeypatch) -> None:
    """The trainer reads its statistics once per step; an `.item()` per micro-batch makes the guard fail."""
    from selective_lm.training.trainer import Trainer

    result = _overhead(tmp_path)
    assert result["extra_syncs_per_step"] == 1 and result["host_syncs"]["trainer"]["tolist"] == 1
    assert result["trainer_step_s"] > 0 and result["bare_step_s"] > 0 and result["micro_batches_per_step"] == 3
    stats = Trainer._micro_stats

    def syncing(self: Trainer, out: Any, mb: Any, ref: Any) -> torch.Tensor:
        float(out.n_selected)  # what a careless log line does
        return stats(self, out, mb, ref)

    monkeypatch.setattr(Trainer, "_micro_stats", syncing)
    assert _overhead(tmp_path)["extra_syncs_per_step"] == 1 + 3


@pytest.mark.parametrize(("method", "lora"), [("topk", True), ("stochastic", False), ("oracle", True)])
def test_more_micro_batches_add_no_host_sync_but_the_models_own(smoke_out: Path, method: str, lora: bool) -> None:
    """A micro-batch more adds only the model's own reads (transformers' causal mask, per forward): none in the
    loss, the selection or the statistics. The step reads its sums once (`tolist`); AdamW also reads its step
    counters, which live on the host on any device (not a device sync, but counted on a CPU run)."""
    from selective_lm.bench.overhead import count_host_syncs
    from selective_lm.method.loss import forward_hidden
    from selective_lm.training.trainer import Trainer

    totals = []
    for accum in (1, 4):
        cfg = load_config("smoke", overrides=[f"train.method={method}", "train.ratio=0.3", f"train.grad_accum={accum}",
                                              f"model.lora={str(lora).lower()}", "eval.every=0"])
        trainer = Trainer(cfg, OutDir(smoke_out), OutDir(smoke_out).run(f"accum{accum}"))
        trainer.model.train()
        with torch.no_grad(), count_host_syncs() as model_own:
            forward_hidden(trainer.model, next(trainer.micro_batches(1)).ids)
        with count_host_syncs() as counts:
            trainer.step(1)
        assert counts["tolist"] == 1
        totals.append(sum(counts.values()) - accum * sum(model_own.values()))
    assert totals[0] == totals[1]


def test_a_cpu_launch_that_started_one_of_several_processes_is_refused(smoke_out: Path, capsys, monkeypatch) -> None:
    """`accelerate launch --cpu --num_processes 2` without MPI starts one process (its environment says so): exit 2."""
    for key, value in {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    capsys.readouterr()
    assert smoke_train(smoke_out) == 2
    err = capsys.readouterr().err
    assert "--multi_gpu --num_processes N" in err and "Traceback" not in err and not (smoke_out / "runs").exists()
