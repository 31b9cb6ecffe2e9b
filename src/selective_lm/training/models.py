"""Load any Hugging Face causal LM (hub id, local dir, embedded, tiny random), a trained run or the
reference; wrap it for LoRA or full fine-tuning; fingerprint tokenizers so stores can refuse a
mismatch; and turn token ids back into display text.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from ..config import Config, ModelConfig
from ..data.assets import byte_tokenizer, cache_dir, embedded_model_dir, file_lock
from ..errors import UserError, first_line
from ..files import atomic_dir, fingerprint, read_json
from ..store.layout import OutDir, RunDir, TokenStore, store_config_fingerprint

RANDOM_MODELS = {
    # hidden ≤ 128 and two layers: the smoke preset and tests train it in seconds on a CPU.
    "tiny-llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    # SmolLM2-135M's exact shape (tied head, its 49,152-token vocabulary whatever the tokenizer): GPU timings of
    # the default study without the embedded model (scripts/gpu_check.py).
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, vocab_size=49152),
    # TinyLlama-1.1B's shape (untied head), randomly initialised: `slm bench` case gpu needs no download.
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_source(cfg: ModelConfig, name: str | None = None) -> str:
    """Resolve `embedded:` names to their cache directory; other names pass through."""
    name = name or cfg.name
    if name.startswith("embedded:"):
        return str(embedded_model_dir(name.split(":", 1)[1]))
    return name


def hub_error(name: str, err: Exception) -> UserError:
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
        raise hub_error(name, e) from None
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
        config = LlamaConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             **{"vocab_size": vocab_size, "tie_word_embeddings": True, **RANDOM_MODELS[key]})
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
        raise hub_error(name, e) from None


def base_model_location(cfg: ModelConfig, vocab_size: int) -> str:
    """What a run's `adapter_config.json` names as its base (`base_model_name_or_path`), so that PEFT's
    `AutoPeftModelForCausalLM.from_pretrained(run/adapter)` loads the run on its own: a Hub id as given, a local or
    embedded model's absolute directory (the adapter may be loaded from anywhere), and a `random:` model, which has
    no files, saved once under `$SLM_CACHE/models/random-<key>-<hash>` (the same seeded weights every run starts
    from, written atomically under a lock as the embedded model's conversion; the hash covers the shape, the
    vocabulary and the torch and transformers versions, whose init code draws the weights)."""
    if not cfg.name.startswith("random:"):
        source = model_source(cfg)
        local = Path(source).expanduser()
        return str(local.resolve()) if local.is_dir() else source
    import transformers

    key = cfg.name.split(":", 1)[1]
    drawn = fingerprint(cfg.name, vocab_size, RANDOM_MODELS.get(key), torch.__version__, transformers.__version__)
    target = cache_dir() / "models" / f"random-{key}-{drawn}"
    if not (target / "config.json").is_file():
        with file_lock(target.with_name(f".{target.name}.lock")):
            if not (target / "config.json").is_file():
                with atomic_dir(target) as tmp:
                    load_model(cfg, vocab_size=vocab_size).save_pretrained(tmp)
    return str(target.resolve())


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


def student_model(cfg: Config, tokenizer: Any, device: torch.device) -> Any:
    """The model a run trains, on `device`: the base weights (checked against the tokenizer and block length),
    gradient checkpointing if asked, then LoRA (`model.lora`) or every weight trainable."""
    model = load_model(cfg.model, vocab_size=len(tokenizer))
    check_model(model, tokenizer, cfg.data.block_len)
    # Compute-matched runs and data-parallel ranks must start from the same LoRA init, whatever the
    # process drew before; dropout then draws from the same seeded stream (restored on resume).
    torch.manual_seed(cfg.train.seed)
    if cfg.train.gradient_checkpointing:  # before LoRA: peft then makes the frozen embeddings' output need grad
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model = (apply_lora(model, cfg.model) if cfg.model.lora else model).to(device)
    if not cfg.model.lora:
        model.requires_grad_(True)
    return model


def _linear_names(model: Any) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


# --------------------------------------------------------------------------- token text


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte → printable-char map, used by byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


_BYTES = _byte_decoder()


def _raw_bytes(token: str) -> bytes | None:
    """The bytes behind a byte-level token ('Ã' ...) or a byte-fallback token ('<0xC3>'); None if neither."""
    if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token):
        return bytes([int(m.group(1), 16)])
    if token and all(c in _BYTES for c in token):
        return bytes(_BYTES[c] for c in token)
    return None


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """Display text per token; a character split over byte tokens shows on its last byte token.

    Decoding one token at a time turns each byte of 'é' into '�': such tokens are fed through an
    incremental UTF-8 decoder instead, so the page reads like the text.
    """
    if tokenizer is None:
        return [f"{i} " for i in ids]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    texts = []
    for tok in tokenizer.convert_ids_to_tokens(ids):
        tok = tok or ""
        text = tokenizer.convert_tokens_to_string([tok])
        raw = _raw_bytes(tok) if "\ufffd" in text and "\ufffd" not in tok else None
        if raw is None:
            texts.append(decoder.decode(b"", final=True) + text)
            decoder.reset()
        else:
            texts.append(decoder.decode(raw))
    return texts


# --------------------------------------------------------------------------- the reference


def reference_description(ref: RunDir) -> dict[str, Any]:
    """reference.json of the out dir's `reference/`; says to run `slm reference` when there is none."""
    if not ref.reference_json.is_file():
        raise UserError(f"no reference model in {ref.path}: run `slm reference --out {ref.path.parent}` first")
    return read_json(ref.reference_json)


def load_reference_model(cfg: Config, out: str | Path | OutDir) -> Any:
    """The reference as a plain causal LM in eval mode (LoRA merged: scoring needs no adapter overhead)."""
    out = OutDir.of(out)
    desc = reference_description(out.reference)
    tokenizer = load_tokenizer(cfg.model)
    if desc.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
        raise UserError("the reference model's tokenizer differs from the student's: they must share one "
                        f"(rerun `slm reference --out {out}`)")
    return open_reference(cfg, out, desc, tokenizer)


def open_reference(cfg: Config, out: OutDir, desc: dict[str, Any], tokenizer: Any) -> Any:
    """Load the reference that `desc` (reference.json) describes and check its vocabulary."""
    if desc["mode"] == "self":
        model = load_model(cfg.model, vocab_size=len(tokenizer))
    elif desc["mode"] == "trained" and out.reference.model_dir.is_dir():
        model = load_model(cfg.model, path=str(out.reference.model_dir))
    else:
        adapter = out.reference.adapter_dir if desc["mode"] == "trained" else Path(desc["path"])
        try:
            model = load_trained(cfg.model, adapter, len(tokenizer))
        except RuntimeError as e:  # peft/torch: an adapter of another base model (shape mismatch)
            raise UserError(f"the reference in {adapter} does not fit model {cfg.model.name}: "
                            f"{first_line(e)}") from None
    n_emb = model.get_input_embeddings().num_embeddings
    if n_emb < len(tokenizer):
        raise UserError(f"the reference model has {n_emb} embeddings but the tokenizer {len(tokenizer)} tokens: "
                        "reference and student must share the tokenizer")
    if desc["mode"] == "path" and not desc.get("own_tokenizer"):
        # No tokenizer files to compare: a vocabulary of another size means another tokenizer.
        student = _student_vocab_size(cfg, tokenizer)
        if student is not None and n_emb != student:
            raise UserError(f"the reference model in {desc['path']} has a vocabulary of {n_emb}, the student "
                            f"{student}: reference and student must share the tokenizer")
    model.eval().requires_grad_(False)
    return model


def _student_vocab_size(cfg: Config, tokenizer: Any) -> int | None:
    """The student's embedding rows, from its config (no weights loaded); None if the config has none."""
    if cfg.model.name.startswith("random:"):
        return len(tokenizer)  # models.load_model builds random models with exactly the tokenizer's size
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_source(cfg.model), revision=cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError):
        return None
    return getattr(config.get_text_config(), "vocab_size", None)


def check_model(model: Any, tokenizer: Any, block_len: int) -> None:
    """Refuse a model that cannot train on a store of this tokenizer and block length."""
    n_emb = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_emb:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings only "
                        f"{n_emb}: use the model's own tokenizer")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and block_len > max_pos:
        raise UserError(f"data.block_len {block_len} exceeds the model's maximum positions {max_pos}")


def check_store(store: TokenStore, cfg: Config, split: str, tokenizer: Any) -> None:
    """Refuse a token store that another tokenizer, block length or data settings built."""
    meta = store.meta
    if meta.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
        raise UserError(f"the token store was built with tokenizer {meta.get('tokenizer')!r}, not the one of "
                        f"model {cfg.model.name!r}: rerun `slm prepare` with this model")
    if meta.get("block_len") != cfg.data.block_len:
        raise UserError(f"the token store has block_len {meta.get('block_len')}, the config "
                        f"{cfg.data.block_len}: rerun `slm prepare` or set data.block_len")
    if meta.get("config_fingerprint") not in (None, store_config_fingerprint(cfg, split)):
        raise UserError(f"the token store in {store.path} was built from other data settings than "
                        "the config's: rerun `slm prepare` with this config")
