"""Loading a config: defaults in code → preset YAML → `--config FILE.yaml` → dotted `key=value` overrides.

As OLMo and torchtune do. Every mistake becomes a `UserError` naming the key and what it
accepts, so the CLI can exit 2 with one line instead of a pydantic traceback; options that
would have no effect are refused too (`_ignored`).
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import UserError, did_you_mean, first_line
from ..method.registry import METHODS, OBJECTIVES
from .plugins import load_plugins
from .sections import DEFAULT_PRESET, REFERENCE_KEYS_READ, describe_error
from .study import Config


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("selective_lm.config.presets").iterdir()
                  if p.name.endswith(".yaml"))


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{origin} is not valid YAML: {first_line(e)}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{origin} must hold a mapping of config sections, got {type(data).__name__}")
    return data


def _preset(name: str) -> dict[str, Any]:
    names = preset_names()
    if name not in names:
        raise UserError(f"unknown preset {name!r}{did_you_mean(name, names)} (available: {', '.join(names)})")
    text = resources.files("selective_lm.config.presets").joinpath(f"{name}.yaml").read_text()
    return _read_yaml(text, f"preset {name}")


def _config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise UserError(f"cannot read config file {p}: {e.strerror or e}") from e
    return _read_yaml(text, f"config file {p}")


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every valid dotted key, mapped to its field info (sections recurse)."""
    keys: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.update(_leaf_keys(ann, f"{prefix}{name}."))
        else:
            keys[f"{prefix}{name}"] = field
    return keys


VALID_KEYS = _leaf_keys(Config)  # the sections' keys; `valid_keys()` adds the registered objectives'


def valid_keys() -> dict[str, Any]:
    """Every valid dotted key now: the sections', and `objectives.<name>.<key>` of each registered objective
    with config keys (plugins' included), in place of the `objectives` mapping itself."""
    keys = {k: v for k, v in VALID_KEYS.items() if k != "objectives"}
    for name, objective in OBJECTIVES.items():
        if objective.params is not None:
            keys.update(_leaf_keys(objective.params, f"objectives.{name}."))
    return keys


def renamed_keys() -> dict[str, str]:
    """Old dotted key -> the key it is now (each objective's `renamed`)."""
    return {old: f"objectives.{name}.{param}" for name, objective in OBJECTIVES.items()
            for old, param in objective.renamed.items()}


def _migrated(tree: dict[str, Any]) -> dict[str, Any]:
    """A stored config with its renamed keys moved to their names now: an out dir made by an earlier version
    loads, and (a default moved is dropped by the validation) describes the same runs."""
    tree = copy.deepcopy(tree)
    for old, new in renamed_keys().items():
        section, key = old.split(".", 1)
        node = tree.get(section)
        if isinstance(node, dict) and key in node:
            _set_dotted(tree, new, node.pop(key))
    return tree


def _check_keys(tree: dict[str, Any], origin: str, prefix: str = "", keys: dict[str, Any] | None = None) -> None:
    """Reject unknown keys, naming the closest valid one (or the name a renamed key has now)."""
    keys = valid_keys() if keys is None else keys
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if dotted in keys:
            continue
        if dotted in (renamed := renamed_keys()):
            raise UserError(f"config key {dotted!r} in {origin} is now {renamed[dotted]!r}")
        if isinstance(value, dict) and any(k.startswith(dotted + ".") for k in keys):
            _check_keys(value, origin, dotted + ".", keys)
            continue
        raise UserError(f"unknown config key {dotted!r} in {origin}{did_you_mean(dotted, keys, cutoff=0.5)}")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Merge one layer over another: sections key by key, every leaf (dicts included) replaced whole."""
    out = dict(base)
    for k, v in extra.items():
        if k in Config.model_fields and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", YAML-parsed value)."""
    if "=" not in item:
        raise UserError(f"override {item!r} must look like key=value (e.g. train.ratio=0.5)")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> Config:
    """Defaults → preset (or `base`: an out dir's stored config, see `outconfig`) → config file → overrides,
    validated; UserError on any mistake, including an option that would have no effect (`_ignored`).

    A custom corpus gets what was asked for: no injected noise unless data.noise_rate is set, and eval.splits
    (unless set) the corpus's own held-out splits, i.e. its data.sources other than train and reference.
    """
    file_layer: dict[str, Any] = {}
    if config_file is not None:
        file_layer = _config_file(config_file)
    if base is not None:
        name, lower_layer, lower_origin = str(base.get("preset", DEFAULT_PRESET)), _migrated(base), \
            "the out dir's stored config"
    else:
        name = preset or str(file_layer.get("preset", DEFAULT_PRESET))
        lower_layer, lower_origin = _preset(name), f"preset {name}"
    parsed = [parse_override(item) for item in overrides]
    # Plugins first: their methods, score kinds and objectives' keys are valid names in every layer.
    plugins = _plugins([v for k, v in parsed if k == "plugins"] or [file_layer.get("plugins"),
                                                                     lower_layer.get("plugins")])
    if file_layer:
        _check_keys(file_layer, f"config file {config_file}")
    _check_keys(lower_layer, lower_origin)
    lower = _merge(_merge(Config().to_dict(), lower_layer), {"preset": name})
    tree = copy.deepcopy(_merge(lower, file_layer))
    override_tree: dict[str, Any] = {}
    for key, value in parsed:
        _check_keys(_nest(key, value), "overrides")
        _set_dotted(tree, key, value)
        _set_dotted(override_tree, key, value)
    tree["plugins"] = plugins
    user = set(leaves(file_layer)) | set(leaves(override_tree))
    _corpus_defaults(tree, user | set(leaves(lower_layer)))
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        raise UserError(describe_error(e, tree)) from None
    before = leaves(lower)
    _ignored(cfg, {k: v for k, v in leaves(tree).items() if k in user and v != before.get(k)})
    return cfg


def _plugins(layers: list[Any]) -> list[str]:
    """Load the plugins of the first layer that names any (overrides, then the config file, then the preset or
    the out dir's config); their resolved names, which the config stores."""
    for value in layers:
        if value:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UserError(f"invalid value for plugins: a list of Python files or modules (got {value!r})")
            return load_plugins(value)
    return []


def leaves(tree: dict[str, Any]) -> dict[str, Any]:
    """Dotted key -> value of the config keys `tree` sets."""
    out: dict[str, Any] = {}
    for key in valid_keys():
        node: Any = tree
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            out[key] = node
    return out


def _corpus_defaults(tree: dict[str, Any], given: set[str]) -> None:
    """A custom corpus's defaults where no layer above the code's defaults set them (`load_config`)."""
    data = tree.get("data")
    if not isinstance(data, dict) or data.get("corpus") != "custom":
        return
    if "data.noise_rate" not in given:
        data["noise_rate"] = 0.0
    sources = data.get("sources")
    if "eval.splits" not in given and isinstance(sources, dict) and isinstance(tree.get("eval"), dict):
        splits = [s for s in sources if s not in ("train", "reference")]
        tree["eval"]["splits"] = splits
        analysis = tree.get("analysis")
        if splits and "analysis.bucket_split" not in given and isinstance(analysis, dict) \
                and analysis.get("bucket_split") not in splits:
            analysis["bucket_split"] = splits[0]


CHAMP_ONLY = ("reference_mix", "val_fraction", "reference_problems", "reference_fraction", "annotated_share")
FORMAT_FIELDS = {"text_field": "text", "prompt_field": "prompt_response", "response_field": "prompt_response",
                 "separator": "prompt_response", "messages_field": "chat"}


def _ignored(cfg: Config, explicit: dict[str, Any]) -> None:
    """UserError for the first of the options set by the user (`explicit`: key -> value set by the config file or the
    overrides, to another value than the preset's) that would have no effect, naming what it would need."""
    t, r, d = cfg.train, cfg.reference, cfg.data

    def no_effect(key: str, why: str) -> UserError:
        value = leaves(cfg.to_dict()).get(key)  # validated; a value at its default is left out of the dump
        value = explicit.get(key) if value is None else value
        return UserError(f"{key}={value} has no effect {why}")

    if "train.threshold" in explicit and "threshold" not in {t.rule, *cfg.grid.rules}:
        raise no_effect("train.threshold", f"with train.rule={t.rule}: it is read by train.rule=threshold "
                        "(or grid.rules with threshold) only")
    used = {METHODS[m].objective for m in (t.method, *cfg.grid.methods)}
    for key in sorted(k for k in explicit if k.startswith("objectives.")):
        objective = key.split(".")[1]
        if objective not in used:
            users = [m for m, e in METHODS.items() if e.objective == objective]
            raise no_effect(key, f"with train.method={t.method}: it is read by the objective {objective} only "
                            f"(train.method or grid.methods with {' or '.join(users)})")
    method = METHODS[t.method]
    if "train.ratio" in explicit and method.ratio is not None:
        raise UserError(f"train.ratio has no effect with train.method={t.method}: it always selects its paper's share, "
                        f"{method.ratio:g} (train.method=topk train.score={method.score or t.score} selects any share)")
    if "train.ratio" in explicit and t.ratio < 1 and not method.selects and method.role == "method":
        raise no_effect("train.ratio", f"with train.method={t.method}: it trains every token (it weighs tokens, it "
                        "selects none)")
    if "train.score" in explicit and method.score is not None and t.score != method.score:
        raise no_effect("train.score", f"with train.method={t.method}: it always selects by score kind {method.score}")
    if "train.ratio" in explicit and t.rule != "topk":
        raise no_effect("train.ratio", f"with train.rule={t.rule}: the rule's threshold sets how many tokens train "
                        "(train.rule=topk reads the ratio)")
    for key in sorted(k for k in explicit if k.startswith("reference.") and k != "reference.mode"):
        field = key.removeprefix("reference.")
        if field not in REFERENCE_KEYS_READ[r.mode]:
            modes = [m for m, keys in REFERENCE_KEYS_READ.items() if field in keys]
            raise no_effect(key, f"with reference.mode={r.mode}: it is read by reference.mode="
                            f"{' or '.join(modes)} only")
    if r.is_self and (scoring := sorted(k for k in explicit if k.startswith("scoring."))):
        raise no_effect(scoring[0], f"with reference.mode={r.mode}: the student's own weights score each batch "
                        "online, nothing is scored or stored")
    if "data.sources" in explicit and d.corpus != "custom":
        raise no_effect("data.sources", f"with data.corpus={d.corpus}: it is read by data.corpus=custom only")
    for field in CHAMP_ONLY:
        if f"data.{field}" in explicit and d.corpus != "champ":
            why = " (the only corpus with annotated wrong steps)" if field == "annotated_share" else ""
            raise no_effect(f"data.{field}", f"with data.corpus={d.corpus}: it is read by data.corpus=champ only{why}")
    for field, fmt in FORMAT_FIELDS.items():
        if f"data.{field}" in explicit and d.format != fmt:
            raise no_effect(f"data.{field}", f"with data.format={d.format}: it is read by data.format={fmt} only")
    if "data.noise_kinds" in explicit and d.noise_rate == 0:
        raise no_effect("data.noise_kinds", "with data.noise_rate=0: no noise is injected")


def _nest(key: str, value: Any) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    _set_dotted(tree, key, value)
    return tree
