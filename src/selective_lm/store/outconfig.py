"""The out dir remembers its config: `<out>/config.yaml`, written by the first command that stores anything there.

A later command without `--preset`/`--config` starts from it, so a forgotten `--preset smoke` cannot
evaluate the smoke runs with the default model and publish that. A command whose settings differ from
it on what shaped the stored artifacts (`Config.artifact_settings`: data.*, model.*, and, with a stored
reference, the reference.* its mode reads and scoring.dtype / scoring.blocks) exits 2 naming the keys.
Training, evaluation and engine settings never conflict: runs are told apart by their names and config
hashes. An out dir made before this file existed gets it from its next command.

When the stored config is the starting point, the keys that pick one run of a single `slm train` (its
name, method, ratio and rule) come from the stored preset instead: the first command's `train.method=topk`
must not make every later `slm train` a top-k run.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..config import DEFAULT_PRESET, Config, leaves, load_config
from ..errors import UserError, first_line
from ..files import write_text
from .layout import OutDir

RUN_SELECTORS = ("name", "method", "ratio", "rule")  # train.* keys of one `slm train`, not of the out dir
_SHOWN = 6  # conflicting keys named in full


def stored(out: OutDir) -> dict[str, Any] | None:
    """The out dir's stored config tree (None when it has none yet)."""
    path = out.config_path
    if not path.is_file():
        return None
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read the out dir's config {path}: {first_line(e)}; restore it or delete it "
                        "(the next command then stores its own)") from None
    if not isinstance(tree, dict):
        raise UserError(f"the out dir's config {path} is not a mapping of config sections; restore it or delete it")
    return tree


def _stored_config(out: OutDir, tree: dict[str, Any]) -> Config:
    try:
        return load_config(base=tree)
    except UserError as e:
        raise UserError(f"the out dir's config {out.config_path} does not load ({e}); restore it or delete it") \
            from None


def resolve(preset: str | None, config_file: str | None, overrides: Sequence[str],
            out: str | Path | None) -> tuple[Config, OutDir]:
    """The command's config and out dir (`--out`, default `out/<preset>`): the stored config plus the overrides
    when neither --preset nor --config is given and the out dir has one, else the usual layers; checked
    against the stored config either way (`check`)."""
    if preset is None and config_file is None:
        root = OutDir(Path(out) if out else Path("out") / DEFAULT_PRESET)
        tree = stored(root)
        if tree is not None:
            preset_train = load_config(str(tree.get("preset", DEFAULT_PRESET))).train
            base = {**tree, "train": {**(tree.get("train") or {}),
                                      **preset_train.model_dump(mode="json", include=set(RUN_SELECTORS))}}
            cfg = load_config(overrides=list(overrides), base=base)
            check(cfg, root)
            return cfg, root
    cfg = load_config(preset, config_file, list(overrides))
    root = OutDir(Path(out) if out else Path("out") / cfg.preset)
    check(cfg, root)
    return cfg, root


def conflicts(cfg: Config, out: OutDir) -> list[tuple[str, Any, Any]]:
    """(key, stored value, this config's value) for every artifact setting that differs from the stored config."""
    tree = stored(out)
    if tree is None:
        return []
    before = _stored_config(out, tree).artifact_settings()
    return [(k, before[k], v) for k, v in cfg.artifact_settings().items() if k in before and before[k] != v]


def check(cfg: Config, out: OutDir) -> None:
    """UserError naming the settings of `cfg` that differ from the out dir's stored config on its artifacts."""
    found = conflicts(cfg, out)
    if not found:
        return
    named = "; ".join(f"{k}: {old!r} there, {new!r} here" for k, old, new in found[:_SHOWN])
    more = f"; and {len(found) - _SHOWN} more" if len(found) > _SHOWN else ""
    raise UserError(f"{out} was made with other settings ({out.config_path}): {named}{more}. Its stores, reference "
                    "and runs depend on them: drop these settings (without --preset/--config a command uses the stored "
                    "config), or use another --out")


def differences(config_yaml: Path, cfg: Config) -> list[str]:
    """`key: old → new` for every config key where `cfg` differs from the config saved at `config_yaml` (a run's
    config.yaml; none when it cannot be read)."""
    try:
        old = leaves(yaml.safe_load(config_yaml.read_text()) or {})
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    return [f"{k}: {old[k]!r} → {v!r}" for k, v in leaves(cfg.to_dict()).items() if k in old and old[k] != v]


def remember(cfg: Config, out: OutDir) -> None:
    """Write `cfg` as the out dir's config unless it has one (or the out dir does not exist)."""
    if out.root.is_dir() and not out.config_path.is_file():
        write_text(out.config_path, cfg.to_yaml())


_HINT = re.compile(r"`slm ([a-z][a-z-]*)((?: [^`]*)?)`")
_OUT_ARG = re.compile(r"\s--out(?:\s+|=)\S+")


def runnable_hints(message: str, selection: Sequence[str], out: OutDir, overrides: Sequence[str]) -> str:
    """`message` with every `` `slm <command> ...` `` it suggests made runnable as printed: the failing command's
    --preset/--config (`selection`), `--out`, and its overrides (before the hint's own, so that those win)."""
    def full(m: re.Match[str]) -> str:
        rest = _OUT_ARG.sub("", m.group(2)).split()
        args = [*selection, "--out", str(out), *overrides, *rest]
        return f"`slm {m.group(1)} {shlex.join(args)}`"

    return _HINT.sub(full, message)
