"""`slm reference`: the reference model that scores the training corpus, and its loading.

`reference.mode`: `trained` (CLM on the reference split, through the same training loop as the
students), `self` (the base model itself, as the cs512 replication scored), or `path` (a peft
adapter or HF model dir of the user's). `reference/reference.json` describes it, with a
`digest` of its weights, so score stores made by another reference are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import __version__
from .config import Config
from .errors import UserError
from .files import file_digest, fingerprint, write_json
from .store.layout import OutDir
from .training.models import load_tokenizer, open_reference, tokenizer_fingerprint
from .training.trainer import Trainer


def reference(cfg: Config, out: str | Path | OutDir) -> dict[str, Any]:
    """Make the reference model available under `out/reference/` and describe it in reference.json.

    `trained`: CLM on the reference split (retrained when its config changed); `self`: the base
    model; `path`: a peft adapter dir (for `model.name`) or an HF model dir, checked here to load
    and to share the student's tokenizer (its own tokenizer files when it has them, else its
    vocabulary size). `digest` identifies the weights, so scores of another reference are refused.
    """
    out = OutDir.of(out)
    ref = out.reference
    mode = cfg.reference.mode
    if cfg.reference.is_self:
        raise UserError(f"reference.mode={mode} has no reference model to make: the student's own weights score "
                        "online during `slm train` / `slm run`")
    tokenizer = load_tokenizer(cfg.model)
    if mode == "trained":
        trainer = Trainer(_reference_train_config(cfg), out, ref, split="reference", build=False)
        summary = trainer.fit(replace_stale=True)
        weights = ref.weights_dir  # sharded full models too
        desc = {"mode": mode, "base": cfg.model.name, "weights": weights.name,
                "digest": fingerprint([file_digest(f) for f in sorted(weights.glob("*.safetensors"))]),
                "train": summary}
    elif mode == "self":
        desc = {"mode": mode, "base": cfg.model.name, "digest": fingerprint(cfg.model.name, cfg.model.revision)}
    else:
        path = Path(str(cfg.reference.path)).expanduser()
        if not path.is_dir():
            raise UserError(f"reference.path {path} is not a directory (a peft adapter or HF model dir)")
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise UserError(f"reference.path {path} holds no .safetensors weights (adapter or HF model dir)")
        configs = [f for f in (path / "adapter_config.json", path / "config.json") if f.is_file()]
        desc = {"mode": mode, "base": cfg.model.name, "path": str(path.resolve()),
                "digest": fingerprint([file_digest(f) for f in files + configs]),
                "own_tokenizer": _check_path_tokenizer(path, tokenizer)}
    desc["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
    desc["version"] = __version__
    if mode == "path":
        open_reference(cfg, out, desc, tokenizer)  # fail now, not at `slm score`
    write_json(ref.reference_json, desc)
    return desc


def _check_path_tokenizer(path: Path, tokenizer: Any) -> bool:
    """True if `path` ships a tokenizer (it must then be the student's); False if it has none."""
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return False
    from transformers import AutoTokenizer

    try:
        own = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer in reference.path {path}: {e}") from None
    if tokenizer_fingerprint(own) != tokenizer_fingerprint(tokenizer):
        raise UserError(f"the tokenizer in reference.path {path} differs from the student's: reference and "
                        "student must share the tokenizer")
    return True


def _reference_train_config(cfg: Config) -> Config:
    """CLM on the reference split with the reference section's budget and adapter; everything else as the
    students (the same base model, tokenizer and data settings)."""
    r = cfg.reference
    train = cfg.train.model_copy(update={
        "name": "reference", "method": "clm", "ratio": 1.0, "steps": r.steps, "batch_size": r.batch_size,
        "grad_accum": r.grad_accum, "lr": r.lr, "snapshot_every": 0, "merge": False,
    })
    model = cfg.model.model_copy(update={"lora": cfg.model.lora if r.lora is None else r.lora,
                                         "lora_r": r.lora_r or cfg.model.lora_r})
    return cfg.model_copy(update={"train": train, "model": model})
