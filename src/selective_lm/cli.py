"""`slm <stage> [--preset NAME | --config FILE] [key=value ...] [--out DIR]`.

Thin on purpose: parse, load the config, call the stage, print its summary. Exit codes:
0 ok, 2 bad input (one line on stderr), 1 internal error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from .config import Config
from .errors import UserError
from .store.layout import OutDir
from .store.outconfig import remember, resolve, runnable_hints

# command -> (help, module, stage function(cfg, out)); stages are imported only when used (torch is slow).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "config": ("print the resolved config as YAML", "cli", "print_config"),
    "prepare": ("tokenize and pack every split into the token store (data/<split>/)", "prepare", "prepare"),
    "reference": ("train (or point to) the reference model (reference/)", "reference", "reference"),
    "score": ("per-token reference losses over the train split (scores/train/)", "scoring", "score"),
    "train": ("one CLM or SLM training run (runs/<name>/)", "train", "train"),
    "eval": ("validation loss and perplexity of a run (runs/<name>/eval.json, token_losses/)", "evaluate",
             "evaluate"),
    "analyze": ("buckets, update cosines, selection diagnostics over the runs (analysis.json)", "analyze",
                "analyze"),
    "report": ("tables and plots from the files of an out dir (report.md, plots/)", "report", "report"),
    "bench": ("speed and peak memory of CLM, SLM, naive SLM steps and of scoring (bench.json)", "bench", "bench"),
    "export-selected": ("the selected tokens of a run's training documents as JSONL (selected.jsonl)", "export",
                        "export_selected"),
    "run": ("the preset's experiment end to end, resumable (results.json)", "pipeline", "run"),
}


def print_config(cfg: Config, out: OutDir) -> None:
    print(cfg.to_yaml(), end="")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit 2 like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.exit(_fail(f"{message} (see: {self.prog} --help)", 2))


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="slm", description="Selective Language Modeling (Rho-1) toolkit")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (help_text, _, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        group = p.add_mutually_exclusive_group()
        group.add_argument("--preset", help="preset name (default: champ-smollm2)")
        group.add_argument("--config", help="YAML config file (may name a preset to start from)")
        p.add_argument("--out", default=None, help="output directory (default: out/<preset>)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
        p.add_argument("--plugins", action="append", metavar="FILE.py,...", help="Python files (or modules) that "
                       "register methods, score kinds or objectives (docs/add-a-method.md; the same as plugins=[...])")
        if name == "config":
            p.add_argument("--reference", action="store_true", help="print the Markdown reference of every config "
                           "key (docs/config.md: types, defaults, descriptions) instead")
        if name == "eval":
            p.add_argument("--tasks", metavar="A,B", help="lm-evaluation-harness tasks to run besides perplexity "
                           "(the same as eval.tasks=[A,B])")
        if name == "export-selected":
            p.add_argument("--format", choices=["jsonl", "hf"], help="selected.jsonl, or selected_hf/: a datasets "
                           "directory any trainer reads (the same as export.format=...)")
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    """The key=value overrides, with `--tasks A,B` (slm eval) as `eval.tasks` (JSON: a YAML list of strings),
    `--format F` (slm export-selected) as `export.format` and `--plugins A,B` (repeatable) as `plugins`."""
    tasks, fmt = getattr(args, "tasks", None), getattr(args, "format", None)
    plugins = [p for item in args.plugins or [] for p in item.split(",") if p]
    return [*args.overrides, *([f"eval.tasks={json.dumps(tasks.split(','))}"] if tasks is not None else []),
            *([f"export.format={fmt}"] if fmt is not None else []),
            *([f"plugins={json.dumps(plugins)}"] if plugins else [])]


def _main_process() -> bool:
    """Rank 0 of an `accelerate launch`, or a plain process."""
    return os.environ.get("RANK", "0") == "0"


def _stage(command: str) -> Callable[[Config, OutDir], Any]:
    _, module, func = COMMANDS[command]
    return getattr(importlib.import_module(f"selective_lm.{module}"), func)


def _fail(message: str, code: int) -> int:
    line = " ".join(str(message).split())  # one line, whatever the exception held
    print(f"slm: error: {line}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Weight-loading bars of transformers/huggingface_hub take < 1 s here and bury our own progress.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # peft calls a transformers property deprecated in v5; the warning says nothing to our users.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    overrides = _overrides(args)
    if getattr(args, "reference", False):  # the defaults in code: nothing to resolve, so nothing else is read
        if args.preset or args.config or args.out or overrides:
            return _fail("slm config --reference describes the defaults in code: it takes no --preset, --config, "
                         "--out or overrides", 2)
        from .config.doc import config_reference

        print(config_reference(), end="")
        return 0
    selection = [*(["--preset", args.preset] if args.preset else []), *(["--config", args.config] if args.config
                                                                         else [])]
    resolved: tuple[Config, OutDir] | None = None
    bad_input = False
    try:
        resolved = resolve(args.preset, args.config, overrides, args.out)
        result = _stage(args.command)(*resolved)
    except (UserError, ValueError) as e:  # pure functions raise ValueError for bad input
        bad_input = True
        message = str(e) if resolved is None else runnable_hints(str(e), selection, resolved[1], overrides)
        return _fail(message, 2)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # atomic writes: nothing half-written is left behind
            return _fail(f"no space left on the device while writing {e.filename or 'output'}: free some space "
                         "and rerun the same command (it resumes)", 2)
        if e.errno in (errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EROFS):
            return _fail(f"cannot write {e.filename or 'the output'}: {e.strerror}; choose another --out", 2)
        raise
    except KeyboardInterrupt:
        print("slm: interrupted", file=sys.stderr)
        return 130
    finally:  # whatever the command stored is described by its config (bad input stored nothing)
        if resolved is not None and not bad_input and args.command != "config" and _main_process():
            with contextlib.suppress(OSError):  # a read-only out dir keeps working without it
                remember(*resolved)
    if result:  # non-main data-parallel ranks return nothing to print
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
