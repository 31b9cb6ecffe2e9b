"""The configuration reference (docs/config.md), generated from the config's own fields.

Written from the pydantic schema — each key's type, constraints, default and `Field` description — so
the page cannot drift from the code: `slm config --reference` prints it, and a test regenerates it and
compares it with the committed page.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ..method.registry import OBJECTIVES
from . import Config

HEADER = """\
# Configuration reference

Generated from the config's own field descriptions by `slm config --reference`
(`src/selective_lm/config/doc.py`): do not edit this page by hand. `tests/test_configdoc.py` fails
when it is out of date; regenerate it with

```bash
slm config --reference > docs/config.md
```

Every key is set as a dotted override (`slm train train.ratio=0.5`), in a preset or in a
`--config FILE.yaml`. The defaults below are the code's; a preset (`src/selective_lm/config/presets/`)
holds only what differs from them, and `slm config --preset NAME [key=value ...]` prints the
values a command will use. Values are YAML: the defaults are written as JSON, which YAML reads.
"""

_BOUNDS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", "≥"), (annotated_types.Lt, "lt", "<"),
           (annotated_types.Le, "le", "≤"))


def _bounds(metadata: list[Any]) -> list[str]:
    """`Field(ge=1, lt=1.0)` and `PositiveInt` constraints as `≥ 1`, `< 1.0`."""
    out = []
    for item in metadata:
        for kind, attr, symbol in _BOUNDS:
            if isinstance(item, kind):
                out.append(f"{symbol} {getattr(item, attr)}")
    return out


def type_text(tp: Any) -> str:
    """A type as a reader of YAML needs it: `int > 0 or auto`, `clm / oracle / topk`, `list[str]`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "`null`"
    if origin is typing.Literal:
        return " / ".join(f"`{a}`" for a in args)
    if origin is typing.Annotated:
        return " ".join([type_text(args[0]), *_bounds(list(tp.__metadata__))])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_text(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _cell(text: str) -> str:
    """Table cell text: one line, with the column separator escaped (GFM reads `\\|` inside code too)."""
    return " ".join(text.split()).replace("|", "\\|")


def _row(key: str, field: FieldInfo) -> str:
    kind = ", ".join([type_text(field.annotation), *_bounds(field.metadata)])
    default = json.dumps(field.get_default(call_default_factory=True), ensure_ascii=False, default=str)
    return f"| `{key}` | {_cell(kind)} | `{_cell(default)}` | {_cell(field.description or '')} |"


def _table(prefix: str, fields: dict[str, FieldInfo]) -> list[str]:
    return ["| key | type | default | description |", "|---|---|---|---|",
            *(_row(f"{prefix}{name}", field) for name, field in fields.items())]


def _is_section(field: FieldInfo) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def config_reference(root: type[BaseModel] = Config) -> str:
    """The Markdown reference of every key of `root`: its top-level keys, then one table per section."""
    top = {name: f for name, f in root.model_fields.items() if not _is_section(f)}
    sections = {name: f.annotation for name, f in root.model_fields.items() if _is_section(f)}
    lines = [HEADER, "Sections: " + " · ".join(f"[`{name}`](#{name})" for name in sections) + "\n"]
    if top:
        lines += ["## Top level\n", *_table("", top), ""]
    for name, section in sections.items():
        lines.append(f"## {name}\n")
        if section.__doc__:
            lines.append(" ".join(inspect.cleandoc(section.__doc__).split()) + "\n")
        lines += [*_table(f"{name}.", section.model_fields), ""]
    if root is Config:
        lines += _objective_sections()
    return "\n".join(lines)


def _objective_sections() -> list[str]:
    """One table per registered objective with config keys (`objectives.<name>.<key>`): the built-ins here (a
    plugin's own keys are validated the same way once it is loaded, and documented by its author)."""
    lines = []
    for name, objective in OBJECTIVES.items():
        if objective.params is not None:
            lines += [f"## objectives.{name}\n", " ".join(objective.doc.split()) + "\n",
                      *_table(f"objectives.{name}.", objective.params.model_fields), ""]
    return lines
