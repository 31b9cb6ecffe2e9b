"""`slm reference` and `slm score`: modes, exactness against plain transformers, resume, fingerprints, bad input."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers.cli import slm
from selective_lm import scoring
from selective_lm.errors import UserError
from selective_lm.files import read_json
from selective_lm.method.loss import valid_mask
from selective_lm.store import frozen
from selective_lm.store.layout import OutDir, load_store
from selective_lm.training.models import load_model, load_tokenizer, tokenizer_fingerprint


def load_scores(out: Path, store, tokenizer):
    """The score store reader, as the trainer calls it."""
    return OutDir(out).scores("train", store, tokenizer_fingerprint(tokenizer))


def one_line_error(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    # Progress bars (ours, transformers' weight loading) may come first; the error is the last line.
    full = capsys.readouterr().err
    err = full.strip().splitlines()[-1]
    assert err.startswith("slm: error:") and "Traceback" not in full, full
    for word in words:
        assert word in err, err
    return err


def naive_losses(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    """Plain transformers: full logits, then cross-entropy of token t from logits t - 1; NaN at t = 0."""
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    out = torch.full(ids.shape, float("nan"))
    out[:, 1:] = ce.view(ids.shape[0], -1)
    return out.numpy()


def base_model(cfg):
    return load_model(cfg.model, vocab_size=len(load_tokenizer(cfg.model))).eval()


def trained_reference(cfg, out: Path):
    """The trained reference loaded independently of scoring.py: base + peft adapter, merged."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model(cfg), str(out / "reference" / "adapter")).merge_and_unload().eval()


# ---------------------------------------------------------------------------- slm reference


def test_reference_trained_is_a_loadable_adapter_with_digest(smoke_cfg, smoke_out: Path, capsys) -> None:
    desc = read_json(smoke_out / "reference" / "reference.json")
    assert desc["mode"] == "trained" and len(desc["digest"]) == 16
    assert desc["train"]["steps"] == smoke_cfg.reference.steps
    assert (smoke_out / "reference" / "adapter" / "adapter_config.json").is_file()
    trained_reference(smoke_cfg, smoke_out)  # loads with plain peft
    before = (smoke_out / "reference" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    assert slm("reference", smoke_out) == 0  # finished: not retrained
    assert (smoke_out / "reference" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == before
    assert read_json(smoke_out / "reference" / "reference.json")["digest"] == desc["digest"]


def test_reference_self_trains_nothing_and_scores_with_the_base_model(smoke_cfg, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(_data_only(smoke_cfg, tmp_path), out / "data")
    assert slm("reference", out, "reference.mode=self") == 0
    assert sorted(p.name for p in (out / "reference").iterdir()) == ["reference.json"]
    assert slm("score", out, "reference.mode=self") == 0
    store = load_store(out / "data" / "train")
    got = np.load(out / "scores" / "train" / "ref_loss.npy")
    np.testing.assert_allclose(got[:32], naive_losses(base_model(smoke_cfg), store.tokens[:32]), atol=1e-4)


def _data_only(smoke_cfg, tmp_path: Path) -> Path:
    from selective_lm.prepare import prepare

    out = tmp_path / "prepared"
    prepare(smoke_cfg, out)
    return out / "data"


def test_reference_path_adapter_and_model_dir(smoke_cfg, smoke_out: Path, tmp_path: Path) -> None:
    expected = np.load(smoke_out / "scores" / "train" / "ref_loss.npy")
    adapter = tmp_path / "my-adapter"
    shutil.copytree(smoke_out / "reference" / "adapter", adapter)
    assert slm("reference", smoke_out, "reference.mode=path", f"reference.path={adapter}") == 0
    assert read_json(smoke_out / "reference" / "reference.json")["own_tokenizer"] is False
    assert slm("score", smoke_out, "reference.mode=path", f"reference.path={adapter}") == 0
    np.testing.assert_array_equal(np.load(smoke_out / "scores" / "train" / "ref_loss.npy"), expected)

    (smoke_out / "config.yaml").unlink()  # another reference.path: the out dir's stored config would refuse it
    model_dir = tmp_path / "my-model"  # a full HF model dir with the student's tokenizer
    trained_reference(smoke_cfg, smoke_out).save_pretrained(model_dir)
    load_tokenizer(smoke_cfg.model).save_pretrained(model_dir)
    assert slm("reference", smoke_out, "reference.mode=path", f"reference.path={model_dir}") == 0
    assert read_json(smoke_out / "reference" / "reference.json")["own_tokenizer"] is True
    assert slm("score", smoke_out, "reference.mode=path", f"reference.path={model_dir}") == 0
    np.testing.assert_allclose(np.load(smoke_out / "scores" / "train" / "ref_loss.npy"), expected, atol=1e-5)


def test_reference_path_with_another_vocabulary_is_refused(smoke_cfg, smoke_out: Path, tmp_path: Path,
                                                           capsys) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from selective_lm.training.models import RANDOM_MODELS

    desc_before = (smoke_out / "reference" / "reference.json").read_text()
    bigger = tmp_path / "bigger-vocab"  # no tokenizer files: the vocabulary size gives it away
    LlamaForCausalLM(LlamaConfig(vocab_size=300, **RANDOM_MODELS["tiny-llama"])).save_pretrained(bigger)
    assert slm("reference", smoke_out, "reference.mode=path", f"reference.path={bigger}") == 2
    one_line_error(capsys, "vocabulary of 300", "257", "share the tokenizer")

    other_tok = tmp_path / "other-tokenizer"  # same size model, but its own (different) tokenizer
    base_model(smoke_cfg).save_pretrained(other_tok)
    tok = load_tokenizer(smoke_cfg.model)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other_tok)
    assert slm("reference", smoke_out, "reference.mode=path", f"reference.path={other_tok}") == 2
    one_line_error(capsys, "tokenizer", "differs")

    assert slm("reference", smoke_out, "reference.mode=path", f"reference.path={tmp_path / 'nope'}") == 2
    one_line_error(capsys, "reference.path")
    assert (smoke_out / "reference" / "reference.json").read_text() == desc_before


# ---------------------------------------------------------------------------- exactness


def test_scores_equal_plain_transformers_losses(smoke_cfg, smoke_out: Path) -> None:
    store = load_store(smoke_out / "data" / "train")
    got = np.load(smoke_out / "scores" / "train" / "ref_loss.npy")
    assert got.dtype == np.float32 and got.shape == store.tokens.shape
    assert np.isnan(got[:, 0]).all() and np.isfinite(got[:, 1:]).all()
    want = naive_losses(trained_reference(smoke_cfg, smoke_out), store.tokens[:])
    np.testing.assert_allclose(got, want, atol=1e-4, equal_nan=True)


def test_online_losses_equal_the_offline_rows(smoke_cfg, smoke_out: Path) -> None:
    """scoring.mode=online (the trainer calls model_token_losses per batch) gives the stored rows."""
    store = load_store(smoke_out / "data" / "train")
    rows = np.array([3, 7, 11, 200])
    ids = torch.from_numpy(np.asarray(store.tokens[rows], dtype=np.int64))
    model = scoring.load_reference_model(smoke_cfg, smoke_out)
    online = frozen.model_token_losses(model, ids, valid_mask(ids), smoke_cfg.scoring.chunk_size)
    offline = np.load(smoke_out / "scores" / "train" / "ref_loss.npy")[rows]
    np.testing.assert_allclose(online.numpy(), offline, atol=1e-5, equal_nan=True)


def test_scoring_does_no_unneeded_work(smoke_cfg, smoke_out: Path, monkeypatch) -> None:
    """Merged LoRA, eval mode, no grad, and never more than chunk_size rows of logits at once."""
    model = scoring.load_reference_model(smoke_cfg, smoke_out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in model.named_modules())
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    rows_seen: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows_seen.append(out.shape[0]))
    shutil.rmtree(smoke_out / "scores")
    scoring.score(smoke_cfg.model_copy(update={"scoring": smoke_cfg.scoring.model_copy(update={"chunk_size": 100})}),
                  smoke_out, model=model)
    store = load_store(smoke_out / "data" / "train")
    assert max(rows_seen) <= 100 and sum(rows_seen) == store.n_blocks * (store.block_len - 1)
    ids = torch.from_numpy(np.asarray(store.tokens[:2], dtype=np.int64))
    with torch.enable_grad():
        assert not frozen.model_token_losses(model, ids, valid_mask(ids), 64).requires_grad


# ---------------------------------------------------------------------------- resume


def test_interrupted_score_resumes_to_the_identical_result(smoke_cfg, smoke_out: Path, monkeypatch) -> None:
    complete = np.load(smoke_out / "scores" / "train" / "ref_loss.npy")
    shutil.rmtree(smoke_out / "scores")
    real, calls, fail_at = frozen.model_token_losses, [], [6]

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at[0]:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(frozen, "model_token_losses", failing)
    with pytest.raises(RuntimeError, match="killed"):
        scoring.score(smoke_cfg, smoke_out)
    score_dir = smoke_out / "scores" / "train"
    assert not (score_dir / "ref_loss.npy").exists() and not (score_dir / "meta.json").exists()
    assert read_json(score_dir / ".ref_loss.progress.json")["done_blocks"] == 5 * smoke_cfg.scoring.batch_size

    calls.clear()
    fail_at[0] = 0
    meta = scoring.score(smoke_cfg, smoke_out)
    n_batches = -(-load_store(smoke_out / "data" / "train").n_blocks // smoke_cfg.scoring.batch_size)
    assert len(calls) == n_batches - 5  # continued, did not restart
    np.testing.assert_array_equal(np.load(score_dir / "ref_loss.npy"), complete)
    assert sorted(p.name for p in score_dir.iterdir()) == ["meta.json", "ref_loss.npy"]
    assert {"token_store", "tokenizer_fingerprint", "reference"} <= set(meta)
    assert meta["reference"] == read_json(smoke_out / "reference" / "reference.json")["digest"]


_SLOW_SCORE = """
import sys, time
from selective_lm.store import frozen
from selective_lm.cli import main
real = frozen.model_token_losses
def slow(*a, **k):
    time.sleep(0.05)
    return real(*a, **k)
frozen.model_token_losses = slow
sys.exit(main(["score", "--preset", "smoke", "--out", sys.argv[1], "scoring.batch_size=4"]))
"""


@pytest.mark.slow
def test_sigkilled_score_resumes_to_the_identical_result(smoke_cfg, smoke_out: Path, tmp_path: Path) -> None:
    shutil.rmtree(smoke_out / "scores")
    fresh = tmp_path / "uninterrupted"
    shutil.copytree(smoke_out, fresh)
    assert slm("score", fresh, "scoring.batch_size=4") == 0
    progress = smoke_out / "scores" / "train" / ".ref_loss.progress.json"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SCORE, str(smoke_out)], stderr=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        deadline = time.monotonic() + 60
        while not (progress.is_file() and read_json(progress)["done_blocks"] >= 40):
            assert proc.poll() is None and time.monotonic() < deadline, "score ended before it could be killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (smoke_out / "scores" / "train" / "ref_loss.npy").exists()
    assert slm("score", smoke_out, "scoring.batch_size=4") == 0
    np.testing.assert_array_equal(np.load(smoke_out / "scores" / "train" / "ref_loss.npy"),
                                  np.load(fresh / "scores" / "train" / "ref_loss.npy"))


# ---------------------------------------------------------------------------- fingerprints


def test_second_score_is_a_no_op(smoke_out: Path, monkeypatch) -> None:
    path = smoke_out / "scores" / "train" / "ref_loss.npy"
    before = path.stat().st_mtime_ns

    def no_model(*args, **kwargs):
        raise AssertionError("a complete score store must not load the reference again")

    monkeypatch.setattr(scoring, "load_reference_model", no_model)
    assert slm("score", smoke_out) == 0
    assert path.stat().st_mtime_ns == before


def test_scores_of_another_token_store_are_refused(smoke_cfg, smoke_out: Path, capsys) -> None:
    assert slm("prepare", smoke_out, "data.seed=1") == 0
    store = load_store(smoke_out / "data" / "train")
    with pytest.raises(UserError, match="another token store"):
        load_scores(smoke_out, store, load_tokenizer(smoke_cfg.model))
    capsys.readouterr()
    assert slm("train", smoke_out, "data.seed=1", "train.method=topk", "train.ratio=0.5") == 2
    one_line_error(capsys, "another token store", "slm score")


def test_scores_of_another_tokenizer_are_refused(smoke_cfg, smoke_out: Path) -> None:
    tok = load_tokenizer(smoke_cfg.model)
    tok.add_tokens(["<extra>"])
    with pytest.raises(UserError, match="another tokenizer"):
        load_scores(smoke_out, load_store(smoke_out / "data" / "train"), tok)


def test_scores_of_another_reference_are_refused(smoke_cfg, smoke_out: Path, capsys) -> None:
    old = read_json(smoke_out / "reference" / "reference.json")["digest"]
    assert slm("reference", smoke_out, "reference.steps=2") == 0  # retrained
    assert read_json(smoke_out / "reference" / "reference.json")["digest"] != old
    with pytest.raises(UserError, match="another reference"):
        load_scores(smoke_out, load_store(smoke_out / "data" / "train"),
                            load_tokenizer(smoke_cfg.model))
    capsys.readouterr()
    assert slm("train", smoke_out, "reference.steps=2", "train.method=topk", "train.ratio=0.5") == 2
    one_line_error(capsys, "another reference", "slm score")
    assert slm("score", smoke_out, "reference.steps=2") == 0  # rescored: accepted again
    load_scores(smoke_out, load_store(smoke_out / "data" / "train"), load_tokenizer(smoke_cfg.model))


# ---------------------------------------------------------------------------- bad input


def test_missing_or_truncated_token_store_exits_2(smoke_out: Path, tmp_path: Path, capsys) -> None:
    assert slm("score", tmp_path / "empty") == 2
    one_line_error(capsys, "no token store", "slm prepare")
    shutil.rmtree(smoke_out / "scores")
    tokens = smoke_out / "data" / "train" / "tokens.npy"
    with open(tokens, "r+b") as f:
        f.truncate(tokens.stat().st_size // 2)
    assert slm("score", smoke_out) == 2
    one_line_error(capsys, "tokens.npy", "truncated or corrupt")
    assert not (smoke_out / "scores" / "train" / "ref_loss.npy").exists()


def test_unwritable_out_dir_exits_2(smoke_out: Path, tmp_path: Path, capsys) -> None:
    # Tests may run as root, where chmod does not stop writes: a regular file in the way does.
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("")
    assert slm("score", not_a_dir / "sub") == 2
    one_line_error(capsys)
    shutil.rmtree(smoke_out / "scores")
    (smoke_out / "scores").write_text("")
    assert slm("score", smoke_out) == 2
    one_line_error(capsys, "cannot write scores")


# ---------------------------------------------------------------------------- scoring.dtype

# Largest relative rounding error of each storage dtype (half an ulp: 2^-11, 2^-8; float16 subnormals aside).
_REL = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_store_reads_back_within_its_precision(smoke_cfg, smoke_out: Path, dtype: str) -> None:
    score_dir = smoke_out / "scores" / "train"
    full = np.load(score_dir / "ref_loss.npy")
    assert slm("score", smoke_out, f"scoring.dtype={dtype}") == 0  # the dtype is a fingerprint: rescored
    raw = np.load(score_dir / "ref_loss.npy")
    assert raw.dtype == {"float16": np.float16, "bfloat16": np.uint16}[dtype] and raw.shape == full.shape
    assert read_json(score_dir / "meta.json")["dtype"] == dtype
    store = load_store(smoke_out / "data" / "train")
    tok_fp = tokenizer_fingerprint(load_tokenizer(smoke_cfg.model))
    values = OutDir(smoke_out).scores("train", store, tok_fp, dtype)
    assert values.shape == full.shape and values.dtype == np.float32
    rows = np.array([0, 5, 17, 200])
    got = np.asarray(values[rows])  # as the trainer reads it
    assert got.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(got), np.isnan(full[rows]))
    np.testing.assert_allclose(got, full[rows], rtol=_REL[dtype], atol=0, equal_nan=True)
    np.testing.assert_allclose(np.asarray(values), full, rtol=_REL[dtype], atol=0, equal_nan=True)
    # The documented way to read the file without this package.
    plain = torch.from_numpy(raw).view(torch.bfloat16) if dtype == "bfloat16" else torch.from_numpy(raw)
    np.testing.assert_array_equal(plain.float().numpy(), np.asarray(values))
    assert OutDir(smoke_out).scored_blocks("train", 64 * 10).size == 10  # NaN detection works on bit patterns


def test_score_store_of_another_dtype_is_refused(smoke_out: Path, capsys) -> None:
    assert slm("score", smoke_out, "scoring.dtype=float16") == 0
    capsys.readouterr()
    assert slm("train", smoke_out, "train.method=topk", "train.ratio=0.5") == 2  # the out dir's stored config
    one_line_error(capsys, "scoring.dtype: 'float16' there, 'float32' here")
    (smoke_out / "config.yaml").unlink()  # an out dir from before config.yaml: the score store's own check
    assert slm("train", smoke_out, "train.method=topk", "train.ratio=0.5") == 2
    err = one_line_error(capsys, "float16", "scoring.dtype=float32")
    assert "slm score" in err
    assert not (smoke_out / "runs").exists()
    # With the store's dtype the trainer reads it (as float32).
    assert slm("train", smoke_out, "train.method=topk", "train.ratio=0.5", "train.steps=2",
               "scoring.dtype=float16") == 0
    (smoke_out / "config.yaml").unlink()  # the train command stored float16
    assert slm("score", smoke_out) == 0  # back to float32: rescored
    assert np.load(smoke_out / "scores" / "train" / "ref_loss.npy").dtype == np.float32


# ---------------------------------------------------------------------------- sharded scoring


class _ThreadRanks(frozen.Ranks):
    """Ranks of threads in one process: the sharding logic without a process group."""

    def __init__(self, world: int, rank: int, barrier, totals: list[int]) -> None:
        super().__init__(world, rank)
        self.barrier, self.totals = barrier, totals

    def wait(self) -> None:
        self.barrier.wait()

    def total(self, value: int) -> int:
        self.totals[self.rank] = value
        self.barrier.wait()
        return sum(self.totals)


def _score_on_threads(cfg, out: Path, world: int, model) -> list:
    """`scoring.score` on `world` thread ranks sharing `model`; their return values."""
    import threading

    barrier, totals, results = threading.Barrier(world, timeout=120), [0] * world, [None] * world
    team = {}

    def rank_main(rank: int) -> None:
        team[threading.get_ident()] = _ThreadRanks(world, rank, barrier, totals)
        results[rank] = scoring.score(cfg, out, model=model)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scoring, "ranks", lambda: team[threading.get_ident()])
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    return results


@pytest.mark.parametrize("blocks", ["all", "used"])
def test_shards_of_two_ranks_make_the_one_process_store(smoke_cfg, smoke_out: Path, tmp_path: Path,
                                                        blocks: str) -> None:
    cfg = smoke_cfg.model_copy(update={"scoring": smoke_cfg.scoring.model_copy(update={"blocks": blocks})})
    model = scoring.load_reference_model(cfg, smoke_out)
    single = tmp_path / "single"
    shutil.copytree(smoke_out, single)
    shutil.rmtree(single / "scores")
    # `used` on 2 processes: the blocks that 2 ranks read, those of one process taking twice the steps.
    twice = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 2 * cfg.train.steps})})
    one = scoring.score(twice, single, model=model)
    shutil.rmtree(smoke_out / "scores")
    results = _score_on_threads(cfg, smoke_out, 2, model)
    assert results[0]["processes"] == 2 and results[1] is None  # only the main rank reports
    score_dir = smoke_out / "scores" / "train"
    assert sorted(p.name for p in score_dir.iterdir()) == ["meta.json", "ref_loss.npy"]
    want = np.load(single / "scores" / "train" / "ref_loss.npy")
    np.testing.assert_array_equal(np.load(score_dir / "ref_loss.npy"), want)
    assert results[0]["blocks"] == one["blocks"]
    if blocks == "used":
        assert 0 < np.isfinite(want[:, 1:]).all(axis=1).sum() < len(want)


def test_partial_store_of_another_process_count_is_refused(smoke_cfg, smoke_out: Path, monkeypatch,
                                                           capsys) -> None:
    """A rank of a 2-process pass dies; resuming it with one process would mix two shardings: exit 2."""
    shutil.rmtree(smoke_out / "scores")
    real, calls = frozen.model_token_losses, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(frozen, "model_token_losses", failing)
    monkeypatch.setattr(scoring, "ranks", lambda: frozen.Ranks(world=2, rank=0))
    with pytest.raises(RuntimeError, match="killed"):
        scoring.score(smoke_cfg, smoke_out)
    score_dir = smoke_out / "scores" / "train"
    progress = read_json(score_dir / ".ref_loss.progress.0-of-2.json")
    assert (progress["world"], progress["rank"], progress["done_blocks"]) == (2, 0, 2 * smoke_cfg.scoring.batch_size)
    monkeypatch.undo()
    partial = (score_dir / ".ref_loss.partial.npy").read_bytes()
    assert slm("score", smoke_out) == 2
    one_line_error(capsys, "2 process(es)", "--num_processes 2", str(score_dir))
    assert (score_dir / ".ref_loss.partial.npy").read_bytes() == partial  # nothing discarded
    assert not (score_dir / "ref_loss.npy").exists()
    assert slm("score", smoke_out, "scoring.batch_size=4") == 0  # another batch size: a new pass, not a resume
    assert sorted(p.name for p in score_dir.iterdir()) == ["meta.json", "ref_loss.npy"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Each rank counts its progress writes (= batches scored) and SIGKILLs itself at the N-th (0: never);
# `accelerate launch` runs a script, not `-c`.
_COUNTING_SCORE = """
import os, signal, sys
from selective_lm import files
from selective_lm.cli import main
real, n = files.write_text, {"calls": 0}
def counting(path, text):
    real(path, text)
    if ".ref_loss.progress" in str(path):
        n["calls"] += 1
        if n["calls"] == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)
files.write_text = counting
code = main(sys.argv[2:])
sys.stderr.write(f"batches scored: {n['calls']}\\n")  # one write: print's two would interleave between ranks
sys.exit(code)
"""


def _launch(out: Path, *overrides: str, prefix: tuple[str, ...] = ("-m", "selective_lm.cli")
            ) -> subprocess.CompletedProcess:
    """`accelerate launch <prefix> score --preset smoke --out <out> <overrides>` on 2 CPU processes (gloo)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           *prefix, "score", "--preset", "smoke", "--out", str(out), *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "TQDM_DISABLE": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_score_the_one_process_store_and_resume_after_a_kill(smoke_cfg, smoke_out: Path,
                                                                           tmp_path: Path, one_thread,
                                                                           capsys) -> None:
    single = tmp_path / "single"  # one process, one thread like each launched rank: the same floats
    shutil.copytree(smoke_out, single)
    shutil.rmtree(single / "scores")
    assert slm("score", single, "scoring.batch_size=4") == 0
    want = np.load(single / "scores" / "train" / "ref_loss.npy")
    score_dir = smoke_out / "scores" / "train"

    shutil.rmtree(smoke_out / "scores")
    script = tmp_path / "counting_score.py"
    script.write_text(_COUNTING_SCORE)
    killed = _launch(smoke_out, "scoring.batch_size=4", prefix=(str(script), "3"))
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert not (score_dir / "ref_loss.npy").exists() and (score_dir / ".ref_loss.partial.npy").is_file()
    # The first rank to die wrote 3 batches of 4; the launcher may have stopped the other one earlier.
    progress = [read_json(p) for p in score_dir.glob(".ref_loss.progress.*-of-2.json")]
    assert max(p["done_blocks"] for p in progress) == 3 * 4, progress
    batches_done = sum(p["done_blocks"] for p in progress) // 4
    capsys.readouterr()
    assert slm("score", smoke_out, "scoring.batch_size=4") == 2  # one process cannot resume two shards
    one_line_error(capsys, "--num_processes 2")

    done = _launch(smoke_out, "scoring.batch_size=4", prefix=(str(script), "0"))
    assert done.returncode == 0, done.stderr[-3000:]
    counts = [int(line.rsplit(" ", 1)[1]) for line in done.stderr.splitlines() if "batches scored:" in line]
    assert len(counts) == 2 and sum(counts) == -(-len(want) // 4) - batches_done, counts  # resumed, not redone
    assert sorted(p.name for p in score_dir.iterdir()) == ["meta.json", "ref_loss.npy"]
    got = np.load(score_dir / "ref_loss.npy")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.nanmax(np.abs(got - want)) <= 1e-6
    meta = read_json(score_dir / "meta.json")
    assert meta["processes"] == 2 and meta["dtype"] == "float32"
    assert done.stdout.count('"token_store"') == 1  # only the main rank prints the result
