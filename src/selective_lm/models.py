"""Load any Hugging Face causal LM (hub id, local dir, embedded, tiny random), wrap it for LoRA
or full fine-tuning, and fingerprint tokenizers so stores can refuse a mismatch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .assets import byte_tokenizer, embedded_model_dir
from .common import UserError
from .config import ModelConfig

RANDOM_MODELS = {
    # hidden ≤ 128 and two layers: the smoke preset and tests train it in seconds on a CPU.
    "tiny-llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_source(cfg: ModelConfig, name: str | None = None) -> str:
    """Resolve `embedded:` names to their cache directory; other names pass through."""
    name = name or cfg.name
    if name.startswith("embedded:"):
        return str(embedded_model_dir(name.split(":", 1)[1]))
    return name


def _hub_error(name: str, err: Exception) -> UserError:
    """A hub id is `org/name` or `name`; anything else that failed is a bad local path."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists():
        return UserError(f"model path {name} does not exist or is not a Hugging Face model directory")
    return UserError(
        f"cannot load {name!r} from the Hugging Face Hub ({type(err).__name__}); "
        "if you are offline, pass a local model directory instead"
    )


def load_tokenizer(cfg: ModelConfig):  # -> PreTrainedTokenizerBase
    """The tokenizer of `cfg.tokenizer` or `cfg.name`; the random models use the byte tokenizer."""
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.name
    if name.startswith("random:"):
        return byte_tokenizer()
    source = model_source(cfg, name)
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(name, e) from None
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer of {name} has no EOS token: packing needs a document separator")
    return tok


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the full vocabulary and special tokens: two tokenizers that split text alike match."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    blob = json.dumps([vocab, special], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_model(cfg: ModelConfig, vocab_size: int | None = None, path: str | None = None):
    """A causal LM in float32 (CPU) or `cfg.dtype`; weights from safetensors only.

    `path` loads another checkpoint (a reference or a merged run) with the same settings.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    name = path or cfg.name
    if name.startswith("random:"):
        key = name.split(":", 1)[1]
        if key not in RANDOM_MODELS:
            raise UserError(f"unknown random model {key!r}; available: {', '.join(RANDOM_MODELS)}")
        if vocab_size is None:
            vocab_size = len(byte_tokenizer())
        tok = byte_tokenizer()
        config = LlamaConfig(vocab_size=vocab_size, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             tie_word_embeddings=True, **RANDOM_MODELS[key])
        # Seeded from the name so every process (reference, each run, each rank) starts identical.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
            return LlamaForCausalLM(config)
    source = model_source(cfg, name)
    dtype = _DTYPES.get(cfg.dtype, torch.float32)
    try:
        return AutoModelForCausalLM.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
            dtype=dtype, use_safetensors=True,
        )
    except (OSError, ValueError) as e:
        raise _hub_error(name, e) from None


def load_trained(cfg: ModelConfig, path: Path, vocab_size: int | None = None) -> Any:
    """A peft adapter dir (merged into a fresh base model) or a full HF model dir, for evaluation."""
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = load_model(cfg, vocab_size=vocab_size)
        return PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    return load_model(cfg, path=str(path))


def apply_lora(model: Any, cfg: ModelConfig) -> Any:
    """Wrap with peft LoRA; refuse target names that match no module (peft would train nothing)."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in cfg.lora_targets if t not in names]
    if missing:
        raise UserError(f"model.lora_targets {missing} match no module of {cfg.name}; "
                        f"linear layers here include: {', '.join(sorted(_linear_names(model)))}")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _linear_names(model: Any) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
