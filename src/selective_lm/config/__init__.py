"""Typed configuration: one section per stage, composed into one `Config`, loaded from presets, files and overrides.

sections.py: the run's sections (data, model, reference, scoring, train); study.py: the study's
sections and `Config`; load.py: presets, YAML files, dotted overrides and the checks of what they set.
"""

from .load import VALID_KEYS, leaves, load_config, parse_override, preset_names, valid_keys
from .sections import (
    DEFAULT_PRESET,
    LORA_ALL_LINEAR,
    SELF_REFERENCE_MODES,
    SPLITS,
    DataConfig,
    ModelConfig,
    ReferenceConfig,
    ScoringConfig,
    TrainConfig,
    describe_error,
)
from .study import AnalysisConfig, BenchConfig, Config, EvalConfig, ExportConfig, GridConfig

__all__ = [
    "DEFAULT_PRESET", "LORA_ALL_LINEAR", "SELF_REFERENCE_MODES", "SPLITS", "VALID_KEYS", "AnalysisConfig",
    "BenchConfig", "Config", "DataConfig", "EvalConfig", "ExportConfig", "GridConfig", "ModelConfig",
    "ReferenceConfig", "ScoringConfig", "TrainConfig", "describe_error", "leaves", "load_config", "parse_override",
    "preset_names", "valid_keys",
]
