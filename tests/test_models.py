import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from selective_lm.config import load_config
from selective_lm.data import assets
from selective_lm.errors import UserError
from selective_lm.training.models import apply_lora, load_model, load_tokenizer, tokenizer_fingerprint


def test_tiny_random_model_is_small_and_identical_across_loads(smoke_cfg) -> None:
    a, b = load_model(smoke_cfg.model), load_model(smoke_cfg.model)
    assert a.config.hidden_size <= 128 and a.config.num_hidden_layers <= 4
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    tok = load_tokenizer(smoke_cfg.model)
    assert a.config.vocab_size == len(tok)


def test_byte_tokenizer_is_lossless() -> None:
    tok = assets.byte_tokenizer()
    text = "Let $x^2 = 4$ — so x ∈ {−2, 2}.\n\tDone ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert max(ids) < len(tok) and tok.eos_token_id == 256


def test_tokenizer_fingerprint_tells_tokenizers_apart(smoke_cfg) -> None:
    byte = load_tokenizer(smoke_cfg.model)
    assert tokenizer_fingerprint(byte) == tokenizer_fingerprint(assets.byte_tokenizer())
    other = assets.byte_tokenizer()
    other.add_tokens(["<extra>"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(byte)


def test_lora_wraps_all_projections_and_rejects_unknown_targets(smoke_cfg) -> None:
    model = apply_lora(load_model(smoke_cfg.model), smoke_cfg.model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == set(smoke_cfg.model.lora_targets)
    bad = smoke_cfg.model.model_copy(update={"lora_targets": ["q_proj", "c_attn"]})
    with pytest.raises(UserError, match="c_attn"):
        apply_lora(load_model(smoke_cfg.model), bad)


@pytest.mark.parametrize("name", ["/does/not/exist", "./missing-model", "random:huge"])
def test_missing_models_are_user_errors(smoke_cfg, name: str) -> None:
    with pytest.raises(UserError):
        load_model(smoke_cfg.model.model_copy(update={"name": name}))


def test_hub_id_offline_says_to_pass_a_local_path(smoke_cfg) -> None:
    with pytest.raises(UserError, match="local model directory"):
        load_model(smoke_cfg.model.model_copy(update={"name": "some-org/some-model"}))


def test_local_model_directory_loads(smoke_cfg, tmp_path: Path) -> None:
    model = load_model(smoke_cfg.model)
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(smoke_cfg.model.model_copy(update={"name": str(tmp_path / "m")}))
    x = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_an_adapter_names_a_base_peft_can_load(smoke_cfg, tmp_path: Path, monkeypatch) -> None:
    """adapter_config.json's base_model_name_or_path: a Hub id as given, a local directory made absolute (the adapter
    may be loaded from another directory), a `random:` model saved once in the cache, bit-identical to its draw."""
    from selective_lm.config import ModelConfig
    from selective_lm.training.models import base_model_location

    monkeypatch.setenv("SLM_CACHE", str(tmp_path / "cache"))
    assert base_model_location(ModelConfig(name="HuggingFaceTB/SmolLM2-135M"), 49152) == "HuggingFaceTB/SmolLM2-135M"
    (tmp_path / "local").mkdir()
    monkeypatch.chdir(tmp_path)
    assert base_model_location(ModelConfig(name="local"), 257) == str(tmp_path / "local")
    saved = Path(base_model_location(smoke_cfg.model, 257))
    assert saved.parent == tmp_path / "cache" / "models" and (saved / "config.json").is_file()
    mtime = (saved / "config.json").stat().st_mtime_ns
    assert base_model_location(smoke_cfg.model, 257) == str(saved)
    assert (saved / "config.json").stat().st_mtime_ns == mtime
    reloaded, drawn = load_model(smoke_cfg.model, path=str(saved)), load_model(smoke_cfg.model, vocab_size=257)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), drawn.state_dict().values(),
                                                 strict=True))
    assert base_model_location(smoke_cfg.model, 300) != str(saved)  # another vocabulary, another model


def test_conversion_is_locked_and_runs_once(monkeypatch, tmp_path: Path) -> None:
    """Two concurrent first loads: one converts, the other waits and reuses the result."""
    monkeypatch.setenv("SLM_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "gguf_path", lambda key: tmp_path / "fake.gguf")
    calls: list[int] = []

    def fake_convert(gguf: Path, target: Path) -> None:
        calls.append(1)
        with assets.atomic_dir(target) as tmp:
            time.sleep(0.3)
            (tmp / "config.json").write_text("{}")

    monkeypatch.setattr(assets, "_convert_gguf", fake_convert)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(assets.embedded_model_dir("smollm2-135m")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and (results[0] / "config.json").is_file()
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.endswith(".tmp")]


def test_first_conversion_says_so_on_stderr(monkeypatch, tmp_path: Path, capsys) -> None:
    """The first load converts for up to 2 min: a line on stderr before and after; later loads print nothing."""
    monkeypatch.setenv("SLM_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "gguf_path", lambda key: tmp_path / "fake.gguf")
    seen: list[str] = []

    def fake_convert(gguf: Path, target: Path) -> None:
        seen.append(capsys.readouterr().err)  # what the user sees while the conversion runs
        with assets.atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("{}")

    monkeypatch.setattr(assets, "_convert_gguf", fake_convert)
    target = assets.embedded_model_dir("smollm2-135m")
    captured = capsys.readouterr()
    assert len(seen) == 1 and "converting the embedded model smollm2-135m" in seen[0] and str(target) in seen[0]
    assert "once" in seen[0] and "converted smollm2-135m in" in captured.err and captured.out == ""
    assert assets.embedded_model_dir("smollm2-135m") == target
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_embedded_smollm2_converts_once_then_loads_fast(monkeypatch, tmp_path: Path) -> None:
    """The real GGUF: two processes start at once, both succeed, one converts (the other waits on the lock and
    loads its copy), and later loads read the copy without converting again."""
    code = ("from selective_lm.config import load_config; from selective_lm.training.models import load_model;"
            "m = load_model(load_config().model); print(m.config.vocab_size)")
    env = {"SLM_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and all("49152" in out for out, _ in outs)
    assert sum("converted smollm2-135m" in err for _, err in outs) == 1, [err[-500:] for _, err in outs]
    monkeypatch.setenv("SLM_CACHE", str(tmp_path))
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    cfg = load_config()
    model, tok = load_model(cfg.model), load_tokenizer(cfg.model)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == files  # read, nothing written again
    assert model.config.model_type == "llama" and len(tok) == 49152
    assert all(p.dtype == torch.float32 for p in model.parameters())
