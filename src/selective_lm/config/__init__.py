"""Typed configuration: one section per stage, composed into one `Config`, loaded from presets, files and overrides.

sections.py: the run's sections (data, model, reference, scoring, train); study.py: the study's
sections and `Config`; load.py: presets, YAML files, dotted overrides and the checks of what they set.
"""

from .load import VALID_KEYS, leaves, load_config, parse_override, preset_names
from .sections import (
    BASELINE_METHODS,
    DEFAULT_PRESET,
    DISTILL,
    EVERY_TOKEN_METHODS,
    LORA_ALL_LINEAR,
    RULES,
    SELF_REFERENCE_MODES,
    SPLITS,
    DataConfig,
    ModelConfig,
    ReferenceConfig,
    ScoringConfig,
    SelectionRule,
    TrainConfig,
    describe_error,
)
from .study import AnalysisConfig, BenchConfig, Config, EvalConfig, ExportConfig, GridConfig

__all__ = [
    "BASELINE_METHODS", "DEFAULT_PRESET", "DISTILL", "EVERY_TOKEN_METHODS", "LORA_ALL_LINEAR", "RULES",
    "SELF_REFERENCE_MODES", "SPLITS", "VALID_KEYS", "AnalysisConfig", "BenchConfig", "Config", "DataConfig",
    "EvalConfig", "ExportConfig", "GridConfig", "ModelConfig", "ReferenceConfig", "ScoringConfig", "SelectionRule",
    "TrainConfig", "describe_error", "leaves", "load_config", "parse_override", "preset_names",
]
