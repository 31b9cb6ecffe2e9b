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
from selective_lm import frozen, scoring
from selective_lm.errors import UserError
from selective_lm.files import read_json
from selective_lm.layout import OutDir, load_store
from selective_lm.loss import valid_mask
from selective_lm.models import load_model, load_tokenizer, tokenizer_fingerprint


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
    from selective_lm.data import prepare

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

    from selective_lm.models import RANDOM_MODELS

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
from selective_lm import frozen
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
