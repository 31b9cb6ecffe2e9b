"""The bad-input catalogue: user mistakes across all commands (docs/troubleshooting.md).

Each one must end with exit 2, one line on stderr naming the problem, no traceback, and no
file under the out dir created or changed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from selective_lm.cli import main

Setup = Callable[[Path, Path], None]  # (out dir, scratch dir) -> None


def _nothing(out: Path, tmp: Path) -> None:
    pass


def _write(name: str, text: str) -> Setup:
    def setup(out: Path, tmp: Path) -> None:
        (tmp / name).write_text(text)

    return setup


def _delete(rel: str) -> Setup:
    def setup(out: Path, tmp: Path) -> None:
        target = out / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return setup


def _truncate_tokens(out: Path, tmp: Path) -> None:
    path = out / "data" / "train" / "tokens.npy"
    path.write_bytes(path.read_bytes()[:1000])


def _corrupt_meta(out: Path, tmp: Path) -> None:
    (out / "data" / "train" / "meta.json").write_text("{not json")


def _other_store_fingerprint(out: Path, tmp: Path) -> None:
    meta_path = out / "scores" / "train" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["token_store"] = "0" * 16
    meta_path.write_text(json.dumps(meta))


def _noise_free_store(out: Path, tmp: Path) -> None:
    from selective_lm.config import load_config
    from selective_lm.prepare import prepare

    prepare(load_config("smoke", overrides=["data.noise_rate=0"]), out, splits=["train"])


def _locked(out: Path, tmp: Path) -> None:
    (out / ".slm.lock").write_text(str(os.getppid()))


def _small_vocab_model(out: Path, tmp: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp / "small-vocab")


def _chat_tokenizer_and_text_rows(out: Path, tmp: Path) -> None:
    """A tokenizer with a chat template, and a corpus whose rows have no `messages` field."""
    from selective_lm.data.assets import byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(tmp / "chat-tok")
    (tmp / "c.jsonl").write_text('{"text": "hello"}\n')


def _chat_tokenizer_and_bot_rows(out: Path, tmp: Path) -> None:
    """A tokenizer with a chat template, and a conversation in ShareGPT's roles (human/bot)."""
    _chat_tokenizer_and_text_rows(out, tmp)
    rows = [{"messages": [{"role": "human", "content": "hi"}, {"role": "bot", "content": "yo"}]}]
    (tmp / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _stored_config(out: Path, tmp: Path) -> None:
    from selective_lm.config import load_config
    from selective_lm.store.layout import OutDir
    from selective_lm.store.outconfig import remember

    remember(load_config("smoke"), OutDir(out))


def _finished_clm(out: Path, tmp: Path) -> None:
    from selective_lm.config import load_config
    from selective_lm.train import train

    train(load_config("smoke", overrides=["train.steps=1"]), out)


SFT = ["data.corpus=custom", "data.sources.train={tmp}/c.jsonl", "data.noise_rate=0"]
CHAT_ROW = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'

# (id, argv after the command's --out, setup, text the one-line error must contain)
CATALOGUE: list[tuple[str, list[str], Setup, str]] = [
    ("unknown key", ["config", "train.ratoi=0.5"], _nothing, "did you mean 'train.ratio'"),
    ("wrong type", ["train", "train.steps=many"], _nothing, "train.steps"),
    ("ratio 0", ["train", "train.ratio=0"], _nothing, "(0, 1]"),
    ("ratio 1.5", ["train", "train.method=topk", "train.ratio=1.5"], _nothing, "(0, 1]"),
    ("unknown method", ["train", "train.method=best"], _nothing, "train.method"),
    ("unknown scope", ["train", "train.scope=rows"], _nothing, "train.scope"),
    ("unknown preset", ["config", "--preset", "smok"], _nothing, "did you mean 'smoke'"),
    ("unreadable YAML", ["config", "--config", "{tmp}/bad.yaml"], _write("bad.yaml", "train: [oops\n"),
     "not valid YAML"),
    ("missing config file", ["config", "--config", "{tmp}/missing.yaml"], _nothing, "cannot read config file"),
    ("run name escapes the out dir", ["train", "train.name=../../elsewhere"], _nothing, "run name"),
    ("missing corpus file", ["prepare", "data.corpus=custom", "data.sources.train={tmp}/none.jsonl"], _nothing,
     "none.jsonl"),
    ("empty corpus", ["prepare", "data.corpus=custom", "data.sources.train={tmp}/empty.jsonl"],
     _write("empty.jsonl", ""), "empty"),
    ("missing text field", ["prepare", "data.corpus=custom", "data.sources.train={tmp}/c.jsonl"],
     _write("c.jsonl", '{"content": "hello"}\n'), "text"),
    ("missing prompt field", ["prepare", *SFT, "data.format=prompt_response"],
     _write("c.jsonl", '{"question": "q", "response": "r"}\n'), "no prompt field 'prompt'"),
    ("missing messages field", ["prepare", *SFT, "data.format=chat", "model.tokenizer={tmp}/chat-tok"],
     _chat_tokenizer_and_text_rows, "no messages field 'messages'"),
    ("chat without a chat template", ["prepare", *SFT, "data.format=chat"], _write("c.jsonl", CHAT_ROW),
     "chat template"),
    ("chat format on the champ corpus", ["prepare", "data.format=chat", "data.noise_rate=0"], _nothing,
     "data.corpus=custom"),
    ("prompt/response with noise", ["prepare", *SFT[:2], "data.format=prompt_response", "data.noise_rate=0.2"],
     _write("c.jsonl", '{"prompt": "q", "response": "r"}\n'), "data.noise_rate=0"),
    ("no token store", ["train"], _delete("data"), "slm prepare"),
    ("truncated tokens.npy", ["train"], _truncate_tokens, "tokens.npy"),
    ("corrupt meta.json", ["train"], _corrupt_meta, "meta.json"),
    ("token store of another block length", ["train", "data.block_len=32"], _nothing, "block_len"),
    ("excess without a score store", ["train", "train.method=topk", "train.ratio=0.5"], _delete("scores"),
     "slm score"),
    ("score store of another corpus", ["train", "train.method=topk", "train.ratio=0.5"], _other_store_fingerprint,
     "another token store"),
    ("score without a reference", ["score"], _delete("reference"), "slm reference"),
    ("missing model path", ["train", "model.name=/does/not/exist"], _nothing, "does not exist"),
    ("hub id while offline", ["train", "model.name=some-org/some-model"], _nothing, "local model directory"),
    ("LoRA targets that match nothing", ["train", "model.lora_targets=[c_attn]"], _nothing, "c_attn"),
    ("vocabulary bigger than the model's", ["train", "model.name={tmp}/small-vocab",
                                            "model.tokenizer=random:tiny-llama"], _small_vocab_model, "embeddings"),
    ("reference with another vocabulary", ["reference", "reference.mode=path", "reference.path={tmp}/small-vocab"],
     _small_vocab_model, "share the tokenizer"),
    ("oracle without a noise mask", ["train", "train.method=oracle", "data.noise_rate=0"], _noise_free_store,
     "noise"),
    ("token store of other data settings", ["train", "data.reference_mix=0.2"], _nothing, "slm prepare"),
    ("eval of a run that does not exist", ["eval", "train.name=nope"], _nothing, "nope"),
    ("export of a run that does not exist", ["export-selected", "train.name=nope"], _nothing, "nope"),
    ("report without results", ["report"], _nothing, "results.json"),
    ("out dir in use", ["run"], _locked, "in use"),
    ("bench ratio out of range", ["bench", "bench.ratio=2"], _nothing, "(0, 1]"),
    ("settings that conflict with the out dir's", ["train", "model.lora_r=16"], _stored_config, "model.lora_r"),
    ("threshold without its rule", ["train", "train.method=topk", "train.threshold=0.5"], _nothing,
     "train.rule=threshold"),
    ("scoring under a self-reference", ["train", "reference.mode=ema", "reference.start_step=2",
                                        "scoring.dtype=float16"], _nothing, "scoring.dtype"),
    ("bad prompt/response row", ["prepare", *SFT, "data.format=prompt_response"],
     _write("c.jsonl", '{"prompt": "q", "response": "r"}\n{"response": "r"}\n'), "line 2"),
    ("chat with unknown roles", ["prepare", *SFT, "data.format=chat", "model.tokenizer={tmp}/chat-tok"],
     _chat_tokenizer_and_bot_rows, "unknown role"),
    ("train-only corpus in slm run", ["run", *SFT], _write("c.jsonl", '{"text": "hello"}\n'), "no held-out split"),
    ("finished run of another config", ["train", "train.steps=1", "train.lr=0.02"], _finished_clm, "train.name"),
]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file()}


@pytest.mark.parametrize(("argv", "setup", "needle"), [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_mistake_exits_2_with_one_line_and_changes_nothing(argv: list[str], setup: Setup, needle: str,
                                                         smoke_out: Path, tmp_path: Path, capsys) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    setup(smoke_out, scratch)
    command, *rest = [a.format(tmp=scratch) for a in argv]
    preset = [] if "--config" in rest or "--preset" in rest else ["--preset", "smoke"]
    before = _snapshot(smoke_out)
    capsys.readouterr()
    try:
        code = main([command, *preset, "--out", str(smoke_out), *rest])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert needle.lower() in err.lower() and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert _snapshot(smoke_out) == before


def test_out_dir_under_a_file_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "a-file").write_text("x")
    assert main(["prepare", "--preset", "smoke", "--out", str(tmp_path / "a-file" / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_full_disk_is_a_clear_error_and_leaves_no_partial_file(smoke_out: Path, monkeypatch, capsys) -> None:
    """A write that fails half-way with ENOSPC: exit 2, one line, the old file intact, no temp file."""
    real = Path.write_text

    def full(self: Path, data: str, *args, **kwargs) -> int:
        real(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    before = _snapshot(smoke_out)
    monkeypatch.setattr(Path, "write_text", full)
    code = main(["reference", "--preset", "smoke", "--out", str(smoke_out), "reference.mode=self"])
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no space left" in err and len(err.splitlines()) == 1, err
    assert _snapshot(smoke_out) == before


@pytest.mark.parametrize("existing", [False, True], ids=["new out dir", "empty out dir"])
def test_a_bad_row_leaves_no_empty_data_dir(tmp_path: Path, existing: bool, capsys) -> None:
    """prepare stages each split under data/ and fails on the val split's second row: neither data/ nor (when
    the command made it) the out dir is left behind, as the troubleshooting page promises."""
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 10}) + "\n" for i in range(5)))
    (tmp_path / "val.jsonl").write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    code = main(["prepare", "--preset", "smoke", "--out", str(out), "data.corpus=custom", "data.noise_rate=0",
                 f"data.sources={{train: '{tmp_path}/train.jsonl', val: '{tmp_path}/val.jsonl'}}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "line 2" in err and len(err.splitlines()) == 1, err
    assert (list(out.iterdir()) == []) if existing else not out.exists()
