"""Plugins: a Python file (or an importable module) that registers methods, score kinds, strategies or
objectives (`method/registry.py`) from outside the package, loaded before a config is validated.

`slm run --plugins my_methods.py ...` (or `plugins: [...]` in a config file) imports each once per process,
by its resolved path; the out dir's config remembers the absolute paths, so that later commands on the same
out dir (`slm report`, a resumed `slm run`) load them again. Every registration made while a plugin loads is
recorded as coming from it, so that errors name it. A plugin that cannot be loaded — no such file, an import
that raises, a name a built-in already has — is a `UserError` naming the plugin, before any work.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path

from ..errors import UserError, first_line
from ..method.registry import registering_from

__all__ = ["load_plugins", "resolve_plugin"]

_LOADED: dict[str, str] = {}  # resolved plugin -> module name: each loads once per process


def resolve_plugin(spec: str) -> str:
    """A plugin's stable name: the absolute path of a file (`*.py` or a path with a separator), else the module."""
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        return str(Path(spec).expanduser().resolve())
    return spec


def _import(spec: str, resolved: str) -> None:
    if resolved.endswith(".py") or Path(resolved).is_absolute():
        path = Path(resolved)
        if not path.is_file():
            raise UserError(f"plugin {spec}: no such file ({path})")
        name = f"slm_plugin_{path.stem}_{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise UserError(f"plugin {spec}: not a Python file ({path})")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling look a module up by name
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
    else:
        importlib.import_module(resolved)


def load_plugins(specs: Iterable[str]) -> list[str]:
    """Import the plugins not yet loaded; return their resolved names (what the config stores)."""
    resolved = []
    for spec in specs:
        key = resolve_plugin(str(spec))
        resolved.append(key)
        if key in _LOADED:
            continue
        try:
            with registering_from(f"plugin {spec}"):
                _import(str(spec), key)
        except UserError:
            raise
        except ModuleNotFoundError as e:
            raise UserError(f"plugin {spec}: {first_line(e)}") from None
        except Exception as e:  # the plugin's own code raised: its message, one line, naming the plugin
            raise UserError(f"plugin {spec} raised {type(e).__name__} when loaded: {first_line(e)}") from None
        _LOADED[key] = spec
    return resolved
