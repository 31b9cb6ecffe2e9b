"""Every script in examples/ runs at smoke size (tiny random models saved as model directories), so none rots."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from selective_lm.config import load_config
from selective_lm.data.assets import byte_tokenizer
from selective_lm.training.models import load_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _texts(n: int, offset: int = 0) -> list[dict[str, str]]:
    return [{"text": f"Problem {i}: {i} + {i} = {2 * i}. So the answer is {2 * i}, and {i} x 3 = {3 * i}."}
            for i in range(offset, offset + n)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke preset's tiny model and byte tokenizer (with a chat template) as a model directory."""
    path = tmp_path_factory.mktemp("tiny")
    load_model(load_config("smoke").model).save_pretrained(path)
    tok = byte_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    return path


def test_every_example_is_tested() -> None:
    tested = {"own_corpus", "trainer_offline_scores", "sft_chat",
              "my_method"}  # tests/test_plugins.py runs its docstring's command from outside the checkout
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_own_corpus(tmp_path: Path) -> None:
    files = {s: _jsonl(tmp_path / f"{s}.jsonl", _texts(n, o)) for s, n, o in
             (("train", 60, 0), ("reference", 30, 100), ("val", 10, 200))}
    out = tmp_path / "out"
    code = _example("own_corpus").run([f"--{s}={f}" for s, f in files.items()] + [
        "--out", str(out), "--preset", "smoke", "data.max_tokens=null", "grid.methods=[topk]", "grid.ratios=[0.5]"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert {"clm", "topk-r0.5"} <= set(results["runs"]) and (out / "report.md").is_file()


def test_trainer_offline_scores(tmp_path: Path, tiny_dir: Path) -> None:
    data = _jsonl(tmp_path / "corpus.jsonl", _texts(20))
    trainer = _example("trainer_offline_scores").run([
        "--model", str(tiny_dir), "--reference", str(tiny_dir), "--data", data, "--out", str(tmp_path / "run"),
        "--block-len", "64", "--steps", "2", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3"])
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(np.isfinite(h["loss"]) for h in logs)
    assert all(h["selected_frac"] == pytest.approx(0.6, abs=0.01) for h in logs)
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert list((tmp_path / "run" / "scores").glob("*/ref_loss.npy"))  # the resumable score cache, finished


def test_sft_chat(tmp_path: Path, tiny_dir: Path) -> None:
    pytest.importorskip("trl")
    chats = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                           {"role": "assistant", "content": f"{2 * i}."},
                           {"role": "user", "content": "And times 3?"},
                           {"role": "assistant", "content": f"{3 * i}."}]} for i in range(8)]
    data = _jsonl(tmp_path / "chats.jsonl", chats)
    trainer = _example("sft_chat").run(["--model", str(tiny_dir), "--reference", str(tiny_dir), "--data", data,
                                        "--out", str(tmp_path / "sft"), "--steps", "1", "--batch-size", "4"])
    logged = trainer.state.log_history[0]
    assert np.isfinite(logged["loss"]) and 0 < logged["selected_frac"] < 1
    # both assistant turns train ("<answer>.\n", a token per byte), nothing else
    assert [sum(label != -100 for label in row) for row in trainer.train_dataset["labels"]] == [
        len(f"{2 * i}.\n{3 * i}.\n") for i in range(8)]
