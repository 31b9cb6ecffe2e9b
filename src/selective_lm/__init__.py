"""selective-lm: Selective Language Modeling (Rho-1) for any Hugging Face causal LM.

The public Python API, for training loops of your own (docs/api.md): `Selection` (which tokens
train), `selective_loss` (the selective loss of one micro-batch), `score` (a reference's per-token
losses as a `datasets` column), `SelectiveTrainer` (transformers' `Trainer` with SLM),
`SelectiveCollator`, and `selective_sft_trainer` (TRL's `SFTTrainer` with SLM). They are imported
on first use: `import selective_lm` stays cheap (no torch, no transformers).
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("selective-lm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# public name -> the module that defines it
_API = {"Selection": "api", "selective_loss": "api", "score": "api", "SelectiveTrainer": "hf_trainer",
        "SelectiveCollator": "hf_trainer", "selective_sft_trainer": "hf_trainer"}
__all__ = ["Selection", "SelectiveCollator", "SelectiveTrainer", "__version__", "score", "selective_loss",
           "selective_sft_trainer"]

if TYPE_CHECKING:
    from .api import Selection, score, selective_loss
    from .hf_trainer import SelectiveCollator, SelectiveTrainer, selective_sft_trainer


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
