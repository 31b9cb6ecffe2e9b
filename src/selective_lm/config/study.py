"""The study's sections (evaluation, analysis, export, bench, grid) and `Config`, the whole run composed of them.

`Config` holds run semantics as methods: the grid's runs and their names, the settings that
shaped stored artifacts (what an out dir remembers).
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import Field, PositiveInt, ValidationError, field_validator, model_validator

from ..errors import UserError
from ..method.registry import METHODS, OBJECTIVES, SCORE_KINDS, Registry
from ..method.spec import RULES
from .sections import (
    DEFAULT_PRESET,
    REFERENCE_KEYS_READ,
    DataConfig,
    ModelConfig,
    ReferenceConfig,
    ScoringConfig,
    Section,
    TrainConfig,
    check_ratio,
    describe_error,
    registered,
    safe_name,
)


class EvalConfig(Section):
    splits: list[str] = Field(default_factory=lambda: ["val_clean", "val_noisy"])

    @field_validator("splits")
    @classmethod
    def _splits(cls, v: list[str]) -> list[str]:
        return [safe_name(x, "split") for x in v]

    batch_size: PositiveInt | Literal["auto"] = Field(
        "auto", description="blocks per evaluation forward (perplexity, learning curve, tasks): auto = 8 on CPU, on "
        "CUDA the largest power of two that fits")
    max_tokens: int | None = Field(
        None, ge=1, description="evaluate about this many tokens of each split, in blocks spread over its "
        "documents (one per document, or over evenly spaced documents when fewer blocks fit; None = all)")
    every: int = Field(15, ge=0, description="learning curve: validation loss on a fixed subset every this many "
                       "training steps, and at step 0 and the end (0 = off)")
    curve_tokens: int = Field(512, ge=1, description="tokens of each eval split in the learning curve's subset")
    tasks: list[str] = Field(
        default_factory=list, description="lm-evaluation-harness tasks run on every evaluated model besides "
        "perplexity (needs `pip install 'selective-lm[eval]'`): the embedded 'champ_answer', any task of "
        "eval.task_paths, or lm-eval's own (those download their data from the Hub); empty = perplexity only")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples per task (None = each task's default)")
    limit: int | None = Field(None, ge=1, description="evaluate only the first this many documents of each task "
                              "(None = all)")
    task_paths: list[str] = Field(
        default_factory=list, description="directories of lm-eval task YAML files, searched before lm-eval's own")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        for name in v:
            if not name or name != name.strip() or "," in name:
                raise ValueError(f"task name {name!r} must be non-empty, without spaces around it or commas")
        if len(set(v)) < len(v):
            raise ValueError(f"a task is named twice in {v}")
        return v


class AnalysisConfig(Section):
    bucket_split: str = "val_clean"
    bucket_quantile: float = Field(0.7, gt=0.0, lt=1.0)
    separation_tokens: int = Field(
        12_800, ge=1, description="scored train tokens on which the step-0 excess loss is compared by token kind")
    trajectory_tokens: int | None = Field(
        None, ge=1, description="tokens of the bucket split evaluated at each trajectory snapshot (None = all)"
    )


class BenchConfig(Section):
    """`slm bench`: timed rounds after warm-up, on random token ids (no prepare needed)."""

    steps: int = Field(5, ge=1, description="timed rounds")
    warmup: int = Field(1, ge=0, description="discarded rounds (first-call allocations, lazy init)")
    batch_size: int = Field(4, ge=1)
    block_len: int = Field(256, ge=2)
    ratio: float = Field(0.6, description="selection ratio of the slm and naive variants")
    large_vocab: int = Field(151_936, ge=0, description="vocabulary of the large-vocab case (0 skips it)")
    cases: list[str] = Field(default_factory=lambda: ["precision", "prepare", "overhead", "gpu"],
                             description="side cases to run after the step cases "
                             "(bench.py SIDE_CASES), each written under its own key of bench.json")
    gpu_model: str = Field("random:tinyllama-1.1b", description="case gpu: the model (full fine-tuning, bf16)")
    gpu_vocab: int = Field(32_000, ge=2, description="case gpu: vocabulary of a random model")
    gpu_batch_size: int = Field(4, ge=1)
    gpu_block_len: int = Field(2048, ge=2)
    gpu_peak_tflops: float | None = Field(
        None, gt=0, description="case gpu: the device's dense bf16 peak for MFU (None: known for H100/H200/A100)")
    gpu_on_cpu: bool = Field(False, description="run case gpu without a GPU (tests, with a small bench.gpu_model)")
    profile: bool = Field(False, description="profile one step of each variant after timing: kernel launches, the "
                          "GPU's busy share of the step, the top kernels and host ops (where a step's time goes)")
    precision_blocks: int = Field(64, ge=1, description="train blocks on which case precision compares top-k "
                                  "selections from float32 and half-precision reference losses")
    prepare_rounds: int = Field(3, ge=1, description="case prepare: round-robin rounds (medians reported)")
    overhead_accum: int = Field(4, ge=1, description="case overhead: micro-batches per optimizer step")
    compile: bool | Literal["auto"] = Field("auto", description="compile the student's decoder layers in the step "
                                            "cases, as train.compile does (auto: on CUDA)")
    prepare_tokens: int = Field(4_000_000, ge=1, description="case prepare: tokens (of model.tokenizer) of the "
                                "generated JSONL corpus that `slm prepare` is timed on")
    targets: dict[str, float] = Field(
        default_factory=lambda: {"slm_step_vs_clm": 1.05, "naive_step_vs_slm": 1.4, "score_vs_forward": 0.95,
                                 "slm_peak_vs_clm": 1.0, "loss_path_peak_vs_logits": 0.25,
                                 "score_f16_topk_agreement": 0.995, "prepare_vs_bare": 0.8,
                                 "overhead_step_vs_bare": 1.15, "overhead_extra_syncs": 1, "gpu_clm_mfu": 0.45,
                                 "gpu_slm_mfu": 0.45, "gpu_slm_step_vs_clm": 1.03, "gpu_score_vs_forward": 0.95},
        description="target -> threshold checked by `slm bench` (bench.py says what each ratio measures and "
        "whether the threshold bounds it from above or below)",
    )

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        return check_ratio(v)


class ExportConfig(Section):
    """`slm export-selected`: the selection as JSONL (text and spans) or as a `datasets` directory for any trainer."""

    format: Literal["jsonl", "hf"] = Field(
        "jsonl", description="jsonl: selected.jsonl, one document per line; hf: selected_hf/, a datasets directory "
        "of blocks (input_ids, labels = -100 on unselected tokens, attention_mask)")
    blocks: Literal["scored", "all"] = Field(
        "scored", description="with a partial score store (scoring.blocks=used, as `make run` makes it): scored = "
        "export the blocks that have reference losses, all = score the missing blocks with the reference first")


class GridConfig(Section):
    methods: list[str] = Field(
        default_factory=lambda: [n for n, m in METHODS.items() if m.in_default_grid], description="the grid's "
        "methods besides CLM and the oracle (registered methods, plugins included): a selecting method runs at "
        "every ratio of grid.ratios (one with a fixed ratio, as entropy_topk's 0.2, at it only, and random at it "
        "too: its count-matched control), a method that "
        "trains every token (an objective's control, a weighting) once. The default is the full grid of the "
        "built-in methods and controls; the default study's preset (champ-smollm2) keeps four of them at ratio 0.5 "
        "for its CPU budget")
    ratios: list[float] = Field(default_factory=lambda: [0.5, 0.3])
    rules: list[Literal[RULES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["topk"], description="train.rule of the grid's runs: topk runs every method x "
        "ratio, positive and threshold (with train.threshold) every method once")
    seeds: int = Field(1, ge=1)
    oracle: bool = True

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        for r in v:
            check_ratio(r)
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        return [registered("method", m, METHODS) for m in v]


def _from(registry: Registry[Any], name: str) -> str:
    """` (from plugin X)` for an entry a plugin registered, so that an error names the file to look at."""
    origin = registry.origins.get(name, "")
    return f" (from {origin})" if origin.startswith("plugin") else ""


def _ratios(method: str, ratios: list[float], rule: str, fixed: list[float]) -> list[float]:
    """The ratios a grid runs a selecting method at: its own fixed one (`registry.Method.ratio`), else the grid's;
    the count-matched control (a control the report pairs by count: random) at the `fixed` ratios of the grid's
    other methods too, so that the 80/20 rule's 20 % has a random control at 20 %."""
    entry = METHODS[method]
    if rule != "topk":
        return ratios
    if entry.ratio is not None:
        return [entry.ratio]
    if entry.role == "control" and entry.compare is None:
        return [*ratios, *(r for r in fixed if r not in ratios)]
    return ratios


class Config(Section):
    """The whole run: one section per stage."""

    preset: str = DEFAULT_PRESET
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    grid: GridConfig = Field(default_factory=GridConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    objectives: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="objective name -> its config keys (`objectives.<name>.<key>`, "
        "documented below per objective); unset keys keep their defaults")
    plugins: list[str] = Field(
        default_factory=list, description="Python files (or importable modules) that register methods, score kinds, "
        "strategies or objectives before the config is validated (docs/add-a-method.md); `slm --plugins` sets it")

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        out = {}
        for name, keys in v.items():
            params = OBJECTIVES[registered("objective", name, OBJECTIVES)].params
            if params is None:
                raise ValueError(f"objective {name!r} has no config keys")
            try:  # only what differs from the defaults (an empty entry says nothing)
                if changed := params.model_validate(keys or {}).model_dump(exclude_defaults=True):
                    out[name] = changed
            except ValidationError as e:  # named in full: the objective's key, not the section's
                err = e.errors()[0]
                key = ".".join(str(p) for p in err["loc"])
                raise ValueError(f"objectives.{name}.{key}: {err['msg']} (got {err.get('input')!r})") from None
        return out

    @model_validator(mode="after")
    def _needs_are_met(self) -> Config:
        """Every method this config may run gets what its score kind and objective need (registry.NEEDS)."""
        for method in dict.fromkeys((self.train.method, *self.grid.methods)):
            sel = self.train.model_copy(update={"method": method})
            try:
                needs = sel.selection().needs
            except ValueError:  # a grid run the rules refuse: `grid_runs` names it
                continue
            what = f"train.method={method}{_from(METHODS, method)}"
            kind_needs = needs - OBJECTIVES[METHODS[method].objective].needs
            if "reference_logits" in needs and self.reference.is_self:
                raise ValueError(f"{what} needs a reference model's next-token distribution, but reference.mode="
                                 f"{self.reference.mode} is the student's own weights: use reference.mode trained, "
                                 "path or self")
            if "reference_logits" in kind_needs and self.scoring.mode == "offline":
                kind = sel.selection_rule().score
                raise ValueError(f"{what}: score kind {kind!r}{_from(SCORE_KINDS, kind)} needs the reference's "
                                 "next-token distribution, "
                                 "which stored scores do not hold: use scoring.mode=online")
            if "history" in needs and not (self.reference.is_self or self.reference.mode == "self"):
                raise ValueError(f"{what} needs a history model (the student's earlier weights): use reference.mode "
                                 "ema, checkpoint or self")
        return self

    def objective_params(self, name: str | None = None) -> Any:
        """The validated config keys of objective `name` (default: train.method's), None when it has none."""
        name = name or METHODS[self.train.method].objective
        params = OBJECTIVES[name].params
        return None if params is None else params.model_validate(self.objectives.get(name, {}))

    @model_validator(mode="after")
    def _self_reference_starts(self) -> Config:
        r = self.reference
        if r.is_self and r.start_step >= self.train.steps:
            raise ValueError(f"reference.start_step ({r.start_step}) must be below train.steps ({self.train.steps}): "
                             f"with reference.mode={r.mode} selection starts at that step")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def grid_runs(self, has_noise: bool) -> dict[str, Config]:
        """run name -> its config: CLM, the oracle (when the train split has a noise mask), then every
        method × ratio, for each of `grid.seeds` seeds from `train.seed`."""
        baseline = {"ratio": 1.0, "rule": "topk", "threshold": None}
        specs: list[dict[str, Any]] = [{"method": "clm", **baseline}]
        if self.grid.oracle and has_noise:
            specs.append({"method": "oracle", **baseline})
        # Once each, the methods that train every token (an objective's control); then every selecting one.
        specs += [{"method": m, **baseline} for m in self.grid.methods if not METHODS[m].selects]
        selecting = [m for m in self.grid.methods if METHODS[m].selects]
        fixed = sorted({r for m in selecting if (r := METHODS[m].ratio) is not None}, reverse=True)
        for rule in self.grid.rules:
            threshold = self.train.threshold if rule == "threshold" else None
            ratios = self.grid.ratios if rule == "topk" else [1.0]  # the threshold sets the count
            specs += [{"method": m, "ratio": r, "rule": rule, "threshold": threshold}
                      for m in selecting for r in _ratios(m, ratios, rule, fixed)]
        runs: dict[str, Config] = {}
        for seed in range(self.train.seed, self.train.seed + self.grid.seeds):
            for spec in specs:
                try:
                    t = TrainConfig.model_validate({**self.train.model_dump(), **spec, "seed": seed, "name": None})
                except ValidationError as e:
                    label = f"{spec['method']} ({spec['rule']})" if METHODS[spec["method"]].selects else \
                        spec["method"]
                    raise UserError(f"grid run {label}: {describe_error(e, {})}") from None
                run = self.model_copy(update={"train": t})
                runs[run.run_name(with_seed=self.grid.seeds > 1)] = run
        return runs

    def run_name(self, with_seed: bool = False) -> str:
        """The run's directory name under runs/ (`TrainConfig.run_name`, with `-ema` / `-ckpt` when a
        self-reference selects it)."""
        params = self.objective_params()
        suffix = OBJECTIVES[METHODS[self.train.method].objective].suffixes
        return self.train.run_name(with_seed, reference_mode=self.reference.mode,
                                   objective_suffixes=suffix(params) if params is not None else [])

    def artifact_settings(self) -> dict[str, Any]:
        """Dotted key -> value of the settings that shape what an out dir stores besides its runs: the token
        stores (data.*, the model's tokenizer), the base model every run starts from (model.*), the reference
        model and its score store (the reference.* its mode reads, scoring.dtype / scoring.blocks) when the
        reference is a stored one. Runs are told apart by their names and config hashes instead, and engine
        settings (train.*) never count: `outconfig` compares these with the out dir's stored config."""
        flat = {f"data.{k}": v for k, v in self.data.model_dump(mode="json").items()}
        flat["data.max_tokens"] = self.data.max_tokens_written_out()
        flat |= {f"model.{k}": v for k, v in self.model.model_dump(mode="json").items()}
        if not self.reference.is_self:
            r = self.reference.model_dump(mode="json", include={"mode", *REFERENCE_KEYS_READ[self.reference.mode]})
            flat |= {f"reference.{k}": v for k, v in r.items()}
            if self.scoring.mode == "offline":
                flat |= {f"scoring.{k}": v for k, v in self.scoring.model_dump(include={"dtype", "blocks"}).items()}
        return flat

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- loading
