"""The package's architecture, checked on its source: the import graph and who owns the on-disk layout.

DESIGN.md and docs/formats.md (Layout): data flows one way (prepare → reference → scoring → train →
evaluate → analyze → report), `pipeline.py` only wires stages, no module imports a stage that runs after
it, and only `store/layout.py` joins paths under `--out`. Nothing is listed by hand but the stage order:
a stage is a module that `slm` runs (`cli.COMMANDS`, a package's submodules included), every other
module is a library, and the pure packages (`method/`, `analysis/`) import nothing with files or config.
"""

from __future__ import annotations

import ast
from pathlib import Path

import selective_lm
from selective_lm.cli import COMMANDS

PACKAGE = "selective_lm"
SRC = Path(selective_lm.__file__).parent

# The stages' modules, from the CLI's own table, in the order the data flows through them (DESIGN.md);
# "cli" itself (`slm config`) is the entry point.
_COMMAND_MODULES = {module for _, module, _ in COMMANDS.values()} - {"cli"}
STAGES = ("prepare", "reference", "scoring", "train", "evaluate", "analyze", "report", "pipeline")
# Side stages: commands of their own that no other module imports.
SIDE_STAGES = tuple(sorted(_COMMAND_MODULES - set(STAGES)))
# Pure packages: tensors and arrays in, tensors and numbers out; what they may import of ours.
PURE = {"method": {"method", "errors"}, "analysis": {"analysis"}}
# At most this many top-level modules: the libraries are grouped into packages by concern.
MAX_TOP_LEVEL = 16


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)  # "" is the package itself


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth (functions included), except under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _known(dotted: str) -> str | None:
    """The package-relative module name of `selective_lm.<dotted>` if it is one of ours."""
    if dotted == PACKAGE:
        return ""
    if dotted.startswith(PACKAGE + "."):
        rel = dotted[len(PACKAGE) + 1:]
        return rel if rel in MODULES else None
    return None


def imports_of(module: str, source: str | None = None) -> set[str]:
    """The package's modules that `module` (its file, or `source` in its place) imports: relative
    imports resolved; `from X import y` counts as importing X.y when that is a module, else X."""
    tree = ast.parse(MODULES[module].read_text() if source is None else source)
    own_package = module if _is_package(module) else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in _runtime_imports(tree):
        if isinstance(node, ast.Import):
            targets.update(t for alias in node.names if (t := _known(alias.name)) is not None)
            continue
        if node.level:
            base_parts = [PACKAGE, *own_package.split(".")] if own_package else [PACKAGE]
            base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join([*base_parts, *([node.module] if node.module else [])])
        else:
            base = node.module or ""
        base_mod = _known(base)
        if base_mod is None:
            continue
        for alias in node.names:
            sub = _known(f"{base}.{alias.name}")
            targets.add(sub if sub is not None else base_mod)
    targets.discard(module)
    return targets


GRAPH = {m: imports_of(m) for m in MODULES}


def _top(module: str) -> str:
    return module.split(".")[0]


def _kind(module: str) -> str:
    """entry (the package, the CLI), stage (what `slm` runs, with its package's submodules), side (a stage
    nothing imports) or library (everything else, whatever its folder)."""
    top = _top(module)
    if module in ("", "cli", "__main__"):
        return "entry"
    if top in STAGES:
        return "stage"
    if top in SIDE_STAGES:
        return "side"
    return "library"


# ----------------------------------------------------------------------------- the graph


def test_the_parser_sees_the_known_edges() -> None:
    """Guards the checks below against a parser that finds nothing."""
    assert "training.trainer" in GRAPH["train"] and "store.layout" in GRAPH["train"]
    assert "report.plots" in GRAPH["report"]  # `from . import plots` in a package's __init__
    assert "analysis.selection" in GRAPH["training.trainer"]  # `from ..analysis import selection as diag`
    assert "data.corpora" in GRAPH["data.corpora.champ"]  # `from . import Document, ...` in a subpackage
    source = """
from typing import TYPE_CHECKING
import numpy, selective_lm.store.layout
from ... import files
from ...analysis.buckets import BUCKETS
if TYPE_CHECKING:
    from ...config import Config
else:
    from ...errors import UserError
def f():
    from ...training.models import load_model
    from . import Document
"""
    assert imports_of("data.corpora.champ", source) == {"store.layout", "files", "analysis.buckets", "errors",
                                                        "training.models", "data.corpora"}
    assert {"prepare", "reference", "scoring", "train", "evaluate", "analyze", "report"} <= GRAPH["pipeline"]


def test_the_stages_are_the_commands() -> None:
    """The stage order names exactly the modules `slm` runs, and each exists: the tuple cannot drift."""
    assert set(STAGES) | set(SIDE_STAGES) == _COMMAND_MODULES
    assert all(m in MODULES for m in _COMMAND_MODULES)
    assert set(SIDE_STAGES) == {"bench", "export"}


def test_top_level_modules_are_few() -> None:
    """Verbs, the public face and the ground (errors, files) at the top; libraries live in packages."""
    top = sorted(p.name for p in SRC.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, top


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> imported modules) as a path, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def _may_import_stage(m: str, stage: str) -> bool:
    """Stages import earlier stages (and their own package); a side stage any stage but the pipeline."""
    if _kind(m) == "stage":
        return STAGES.index(_top(stage)) <= STAGES.index(_top(m))
    return _kind(m) == "side" and _top(stage) != "pipeline"


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports against the design: a stage importing a later (or side) stage, a library importing any
    stage, anyone importing a side stage or the CLI, a pure package importing more than it may."""
    bad = []
    for m, targets in graph.items():
        for t in sorted(targets):
            name = m or PACKAGE
            if (_top(t) in SIDE_STAGES and _top(t) != _top(m)) or t in ("cli", "__main__"):
                bad.append(f"{name} imports {t}, which nothing may import")
            elif _kind(t) == "stage" and not _may_import_stage(m, t):
                bad.append(f"{name} ({_kind(m)}) imports stage {t}")
            elif _top(m) in PURE and _top(t) not in PURE[_top(m)]:
                bad.append(f"{name} (pure) imports {t}")
    return bad


def test_the_checks_catch_bad_graphs() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layering_violations({"train": {"scoring", "store.layout"}, "prepare": {"config"}}) == []
    assert layering_violations({"scoring": {"train"}}) == ["scoring (stage) imports stage train"]
    assert layering_violations({"training.models": {"prepare"}}) == ["training.models (library) imports stage prepare"]
    assert layering_violations({"export": {"evaluate"}, "bench.steps": {"train"}}) == []
    assert layering_violations({"export": {"pipeline"}}) == ["export (side) imports stage pipeline"]
    assert layering_violations({"pipeline": {"export"}}) == ["pipeline imports export, which nothing may import"]
    assert layering_violations({"train": {"cli"}}) == ["train imports cli, which nothing may import"]
    assert layering_violations({"analyze": {"report.plots"}}) == ["analyze (stage) imports stage report.plots"]
    assert layering_violations({"report.tables": {"report"}}) == []
    assert layering_violations({"method.loss": {"files"}}) == ["method.loss (pure) imports files"]


def test_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(m or PACKAGE for m in cycle or [])


def test_no_module_imports_a_later_stage_a_side_stage_or_the_cli() -> None:
    """Stages import earlier stages only, side stages any but the pipeline; libraries (config/, store/,
    training/, method/, data/, ...) import no stage; export, bench and the CLI are imported by nobody;
    method/ and analysis/ stay pure."""
    bad = layering_violations(GRAPH)
    assert not bad, bad


def private_imports(module: str, source: str | None = None) -> list[str]:
    """`_name`s that `module` imports from another of our modules (`from .x import _y`, or `x._y` of a
    module imported as `x`): a private name is its module's own."""
    tree = ast.parse(MODULES[module].read_text() if source is None else source)
    found, aliases = [], set()
    for node in _runtime_imports(tree):
        ours = node.level > 0 if isinstance(node, ast.ImportFrom) else False
        ours |= isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE)
        for alias in node.names:
            if isinstance(node, ast.ImportFrom) and ours:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(alias.name)
                else:
                    aliases.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{node.value.id}.{node.attr}")
    return sorted(found)


def test_the_private_check_sees_private_names() -> None:
    source = "from .errors import _x, y\nfrom . import files\nfrom torch import _C\nfiles._lock()\ny._z"
    assert private_imports("api", source) == ["_x", "files._lock", "y._z"]


def test_no_module_imports_another_modules_private_name() -> None:
    bad = {m: found for m in MODULES if (found := private_imports(m))}
    assert not bad, bad


# ----------------------------------------------------------------------------- paths under --out

LAYOUT_NAMES = {"runs", "train.json", "scores", "data"}


def _joins(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every `x / "name"`, `"name" / x`, `.joinpath(..., "name", ...)` and
    `os.path.join(..., "name", ...)` with a layout name."""
    found = []
    for node in ast.walk(tree):
        operands: list[ast.expr] = []
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            operands = [node.left, node.right]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
            "joinpath", "join"
        ):
            operands = list(node.args)
        for op in operands:
            if isinstance(op, ast.Constant) and isinstance(op.value, str) and op.value.strip("/") in LAYOUT_NAMES:
                found.append((node.lineno, op.value))
    return sorted(found)


def test_the_join_check_sees_a_join() -> None:
    assert _joins(ast.parse('p = out / "runs" / name\nq = out.joinpath("scores")')) == [(1, "runs"), (2, "scores")]
    assert _joins(ast.parse('"-".join(["data", x])\nd = {"runs": 1}')) == []


def test_only_layout_joins_paths_under_out() -> None:
    bad = []
    for m, path in MODULES.items():
        if m == "store.layout":
            continue
        for line, name in _joins(ast.parse(path.read_text())):
            bad.append(f"{path.relative_to(SRC.parent)}:{line} joins {name!r}")
    assert not bad, f"ask store.layout's OutDir / RunDir for these paths: {bad}"
    assert _joins(ast.parse(MODULES["store.layout"].read_text()))  # layout does join them
