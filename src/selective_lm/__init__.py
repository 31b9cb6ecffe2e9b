"""selective-lm: Selective Language Modeling (Rho-1) for any Hugging Face causal LM."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("selective-lm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
