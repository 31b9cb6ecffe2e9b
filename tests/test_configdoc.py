"""docs/config.md is generated from the config's own fields (configdoc.py) and must match the code."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field, PositiveInt

from selective_lm.cli import main
from selective_lm.config import Config
from selective_lm.config.doc import config_reference
from selective_lm.method.registry import OBJECTIVES

PAGE = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_docs_config_md_is_up_to_date() -> None:
    assert PAGE.read_text() == config_reference(), (
        "docs/config.md is out of date: regenerate it with `slm config --reference > docs/config.md`")


def test_cli_prints_the_reference(capsys) -> None:
    assert main(["config", "--reference"]) == 0
    assert capsys.readouterr().out == config_reference()


@pytest.mark.parametrize("extra", [["--preset", "smoke"], ["train.ratio=0.5"], ["--out", "x"]])
def test_reference_takes_no_settings(extra: list[str], capsys) -> None:
    assert main(["config", "--reference", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--reference describes the defaults in code" in err


def _rows(page: str) -> dict[str, list[str]]:
    """key -> its table cells (type, default, description)."""
    rows = {}
    for line in page.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_every_key_is_documented_with_its_description() -> None:
    rows = _rows(config_reference())
    expected = {}
    for name, field in Config.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            expected |= {f"{name}.{k}": f for k, f in section.model_fields.items()}
        else:
            expected[name] = field
    for name, objective in OBJECTIVES.items():  # each objective's keys: objectives.<name>.<key>
        if objective.params is not None:
            expected |= {f"objectives.{name}.{k}": f for k, f in objective.params.model_fields.items()}
    assert "objectives.distill.weight" in expected
    assert set(rows) == set(expected)  # data.num_proc too, though config dumps leave it out
    for key, field in expected.items():
        assert rows[key][2] == " ".join((field.description or "").split()).replace("|", "\\|"), key  # GFM cell


class _Inner(BaseModel):
    """A section, described."""

    size: PositiveInt | Literal["auto"] = Field("auto", description="rows | per step")
    share: float = Field(0.5, ge=0.0, lt=1.0)
    names: list[str] = Field(default_factory=lambda: ["a"])
    cap: int | None = None
    sep: str = "\n"


class _Root(BaseModel):
    label: str = "x"
    inner: _Inner = Field(default_factory=_Inner)


def test_types_defaults_and_constraints_are_rendered() -> None:
    page = config_reference(_Root)
    rows = _rows(page)
    assert rows["inner.size"] == ["int > 0 or `auto`", '`"auto"`', "rows \\| per step"]
    assert rows["inner.share"] == ["float, ≥ 0.0, < 1.0", "`0.5`", ""]
    assert rows["inner.names"] == ["list[str]", '`["a"]`', ""]
    assert rows["inner.cap"] == ["int or `null`", "`null`", ""]
    assert rows["inner.sep"] == ["str", '`"\\n"`', ""]
    assert rows["label"] == ["str", '`"x"`', ""]
    assert "## inner\n\nA section, described.\n" in page
