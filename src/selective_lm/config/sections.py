"""The sections of the configuration a run is made of: data, model, reference, scoring, training.

Each section validates its own fields; what depends on several sections is `Config`'s (study.py).
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from ..data.corpora import CORPORA
from ..errors import did_you_mean
from ..method.registry import METHODS, SCORE_KINDS
from ..method.selection import SCOPES
from ..method.spec import RULES, STOCHASTIC, Selection, SelectionRule

DEFAULT_PRESET = "champ-smollm2"
LORA_ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPLITS = ("reference", "train", "val_clean", "val_noisy")
DEFAULT_CAP = "default"  # data.max_tokens key: the cap of every split not named
# train.report_to: the experiment trackers accelerate drives, and the package each needs (pip's name).
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet-ml", "aim": "aim",
            "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


# Choices are read from the registries (method/registry.py) when a config is validated, not when this module is
# imported: a new strategy, score kind, objective or corpus, built in or from a plugin, needs no change here.
Scope = Literal[SCOPES]  # type: ignore[valid-type]


def registered(what: str, name: str, registry: dict[str, Any]) -> str:
    """`name` if `registry` has it (a method, a score kind), else a ValueError that suggests the closest."""
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}{did_you_mean(name, registry)} (choices: {', '.join(registry)})")
    return name

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_ratio(v: float) -> float:
    """A selection ratio: in (0, 1] (NaN refused)."""
    if not (0.0 < v <= 1.0) or math.isnan(v):
        raise ValueError(f"must be in (0, 1] (got {v})")
    return v


def safe_name(value: str, what: str) -> str:
    """Names that become paths under --out (run names, split names) may not climb out of it."""
    if not _SAFE_NAME.match(value) or ".." in value:
        raise ValueError(f"{what} {value!r} must be letters, digits, '.', '_' or '-' (it becomes a directory name)")
    return value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Fields added after stores and runs were first made: left out of `hashed()` while at their
    # default, so the fingerprints of stores and runs made before them stay what they were.
    LATER_FIELDS: ClassVar[tuple[str, ...]] = ()

    def hashed(self, **dump: Any) -> dict[str, Any]:
        """`model_dump(**dump)` for fingerprints: LATER_FIELDS at their default are left out."""
        out = self.model_dump(**dump)
        for name in self.LATER_FIELDS:
            if getattr(self, name) == type(self).model_fields[name].get_default(call_default_factory=True):
                out.pop(name, None)
        return out


class DataConfig(Section):
    """What `slm prepare` builds: corpora, splits, noise injection and packing."""

    corpus: str = Field("champ", description="a registered corpus (corpora/): 'champ' (the embedded CHAMP math "
                        "corpus) or 'custom' (data.sources)")
    sources: dict[str, str] = Field(
        default_factory=dict,
        description="split -> datasets source: local .jsonl/.json/.txt/.parquet/.csv or a hub name, "
        "optionally 'name@split' (datasets split syntax, e.g. 'owm@train[:20000]')",
    )
    text_field: str = "text"
    format: Literal["text", "prompt_response", "chat"] = Field(
        "text", description="custom corpora: 'text' trains every token; 'prompt_response' (data.prompt_field + "
        "data.separator + data.response_field) and 'chat' (data.messages_field rendered with the tokenizer's chat "
        "template) train the response / assistant tokens only (loss_mask.npy): prompts are never trained, never "
        "selected, and not counted by train.ratio or evaluation")
    prompt_field: str = Field("prompt", description="data.format=prompt_response: the prompt's field")
    response_field: str = Field("response", description="data.format=prompt_response: the response's field")
    messages_field: str = Field("messages", description="data.format=chat: the field holding the conversation, "
                                "a list of {role, content} messages; the assistant messages are trained")
    separator: str = Field("\n", description="data.format=prompt_response: text between prompt and response; "
                           "part of the prompt, so not trained")
    block_len: int = Field(128, ge=2, description="tokens per packed block")
    noise_rate: float = Field(0.2, ge=0.0, lt=1.0, description="injected-noise fraction of train tokens")
    noise_kinds: dict[str, float] = Field(
        default_factory=lambda: {"web": 0.3, "numbers": 0.3, "foreign_step": 0.25, "truncate": 0.15},
        description="relative weights of the noise kinds injected into train",
    )
    max_tokens: int | dict[str, int] | None = Field(
        default_factory=lambda: {"reference": 120_000, "train": 300_000, "val_clean": 20_000, "val_noisy": 20_000},
        description="cap on tokens per split: one number for all, or split -> tokens, where the key 'default' caps "
        "every split not named (without it those are not capped); `slm prepare` warns when a cap names a split the "
        "corpus does not have while one of its splits goes uncapped",
    )
    reference_mix: float = Field(
        0.5, ge=0.0, le=1.0, description="share of noise-free model-written text in the reference split"
    )
    val_fraction: float = Field(0.15, gt=0.0, lt=1.0, description="share of CHAMP problems held out")
    reference_problems: Literal["disjoint", "shared"] = Field(
        "disjoint", description="CHAMP: 'disjoint' draws the reference split from its own problems, in neither train "
        "nor validation, so the reference has not learned the training problems' statements; 'shared' (the old "
        "behaviour, to reproduce old results) uses the training problems' human documents and reserved conversations"
    )
    reference_fraction: float = Field(
        0.25, gt=0.0, lt=1.0, description="CHAMP, reference_problems=disjoint: share of the problems (per category) "
        "kept for the reference split. 0.25 (66 of 270) gives it ~27k human SmolLM2 tokens, ~53k with "
        "reference_mix=0.5: 1.3x the 41k that the default reference training reads (80 steps x 4 x 128), while "
        "train keeps 60 % of the problems (162), more than enough for its 300k tokens"
    )
    annotated_share: float = Field(
        0.25, ge=0.0, lt=1.0, description="CHAMP: share of the train and val_noisy text taken from the "
        "conversations whose first wrong step CHAMP annotates (token kinds after_wrong_step / before_wrong_step), "
        "interleaved with the others from the start of the split until they run out: 0.25 puts about 2.6k of their "
        "tokens in the default study's 20k trained and 8 documents in val_noisy's evaluation; 0 = their natural "
        "share (about 3 %: 540 of 19,440 conversations; the document order of releases before the labels)")
    bad_rows: Literal["error", "skip"] = Field(
        "error", description="custom corpora: a row without its fields' text (missing, not a string, an empty "
        "response, a conversation without an assistant turn or with an unknown role) stops `slm prepare` naming "
        "the file and line (error), or is skipped and counted in the split's meta.json (skip)")
    doc_boundaries: bool = Field(False, description="mask targets that cross a document separator")
    seed: int = 0
    num_proc: int = Field(
        1, ge=1, exclude=True, description="tokenizer processes of `slm prepare` (1: in process, no pool). How a "
        "store is made, not what it holds (the same bytes for every value): left out of config dumps and "
        "fingerprints, so a store prepared with 2 processes is reused with 1"
    )

    LATER_FIELDS: ClassVar[tuple[str, ...]] = ("format", "prompt_field", "response_field", "messages_field",
                                               "separator", "bad_rows", "annotated_share")

    @field_validator("corpus")
    @classmethod
    def _corpus(cls, v: str) -> str:
        if v not in CORPORA:
            raise ValueError(f"unknown corpus {v!r}{did_you_mean(v, CORPORA)} (available: {', '.join(CORPORA)})")
        return v

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: dict[str, str]) -> dict[str, str]:
        for split in v:
            safe_name(split, "split")
        return v

    @field_validator("noise_kinds")
    @classmethod
    def _kinds(cls, v: dict[str, float]) -> dict[str, float]:
        known = {"web", "numbers", "foreign_step", "truncate"}
        for k, w in v.items():
            if k not in known:
                raise ValueError(f"unknown noise kind {k!r}; known: {sorted(known)}")
            if w < 0:
                raise ValueError(f"noise kind {k!r} has negative weight {w}")
        if v and sum(v.values()) <= 0:
            raise ValueError("noise kind weights sum to 0")
        return v

    @model_validator(mode="after")
    def _problem_shares(self) -> DataConfig:
        if self.reference_problems == "disjoint" and self.val_fraction + self.reference_fraction >= 1:
            raise ValueError(f"data.val_fraction + data.reference_fraction = "
                             f"{self.val_fraction + self.reference_fraction:g} leaves no problems for train")
        return self

    @model_validator(mode="after")
    def _supervised_format(self) -> DataConfig:
        if self.format == "text":
            return self
        if self.corpus != "custom":
            raise ValueError(f"data.format={self.format} reads fields of the user's rows: it needs data.corpus=custom "
                             f"(got {self.corpus!r})")
        if self.noise_rate > 0:  # injected text would shift the characters the prompt/response spans point at
            raise ValueError(f"data.format={self.format} cannot inject noise (it would move the prompt/response "
                             f"boundaries): set data.noise_rate=0")
        return self

    def hashed(self, **dump: Any) -> dict[str, Any]:
        """As `Section.hashed`, but CHAMP keeps data.annotated_share at its default too (CHAMP's stores changed
        with the wrong-step labels), and other corpora never have it (they have no annotations to interleave)."""
        out = super().hashed(**dump)
        if self.corpus == "champ":
            out["annotated_share"] = self.annotated_share
        else:
            out.pop("annotated_share", None)
        if "max_tokens" in out:
            out["max_tokens"] = self.max_tokens_written_out()
        return out

    def max_tokens_written_out(self) -> int | dict[str, int | None] | None:
        """data.max_tokens with its `default` entry written out for each split the corpus has (CHAMP's four, a custom
        corpus's sources): the same caps written either way hash and compare alike (runs, the out dir's config),
        and configs without a `default` entry hash as they always did."""
        caps = self.max_tokens
        splits = list(self.sources) if self.corpus == "custom" else list(SPLITS) if self.corpus == "champ" else None
        if not isinstance(caps, dict) or DEFAULT_CAP not in caps or splits is None:
            return caps
        return {**{s: self.cap(s) for s in splits}, **{k: v for k, v in caps.items() if k != DEFAULT_CAP}}

    def cap(self, split: str) -> int | None:
        """Token cap of one split (None = no cap): its own entry, else the `default` entry."""
        if isinstance(self.max_tokens, dict):
            return self.max_tokens.get(split, self.max_tokens.get(DEFAULT_CAP))
        return self.max_tokens


class ModelConfig(Section):
    name: str = Field(
        "embedded:smollm2-135m",
        description="hub id, local dir, 'embedded:smollm2-135m' or 'random:tiny-llama'",
    )
    revision: str | None = None
    tokenizer: str | None = Field(None, description="tokenizer source when it differs from model.name")
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    lora: bool = True
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_targets: list[str] = Field(default_factory=lambda: list(LORA_ALL_LINEAR))


SELF_REFERENCE_MODES = ("ema", "checkpoint")  # the student's own weights are the reference, scored online
SELF_REFERENCE_SUFFIX = {"ema": "ema", "checkpoint": "ckpt"}  # in the names of the runs that select with them


# reference.mode -> the other reference.* keys it reads (a key no mode reads is an ignored option: `_ignored`)
REFERENCE_KEYS_READ = {"trained": ("steps", "batch_size", "grad_accum", "lr", "lora", "lora_r"), "self": (),
                       "path": ("path",), "ema": ("ema_decay", "start_step"),
                       "checkpoint": ("start_step", "checkpoint_step")}


class ReferenceConfig(Section):
    LATER_FIELDS: ClassVar[tuple[str, ...]] = ("ema_decay", "start_step", "checkpoint_step")

    mode: Literal[("trained", "self", "path", *SELF_REFERENCE_MODES)] = Field(  # type: ignore[valid-type]
        "trained", description="trained: CLM on the reference split; self: the base model; path: reference.path; "
        "ema: an exponential moving average of the student's trainable weights; checkpoint: the student's weights "
        "at step reference.checkpoint_step (ema and checkpoint are scored online, during training)")
    path: str | None = Field(None, description="HF model dir / adapter for mode=path")
    ema_decay: float = Field(0.99, gt=0.0, lt=1.0, description="mode=ema: after every optimizer step the reference "
                             "becomes decay x reference + (1 - decay) x student")
    start_step: int = Field(10, ge=1, description="modes ema and checkpoint: selecting runs train every token for "
                            "this many optimizer steps first (a reference equal to the student scores every token 0)")
    checkpoint_step: int = Field(0, ge=0, description="mode checkpoint: the step whose weights are the frozen "
                                 "reference (0: the start weights, i.e. the base model with LoRA); below start_step")
    steps: int = Field(40, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0)
    lora: bool | None = Field(None, description="LoRA (true) or full fine-tuning (false) of a trained reference; "
                              "None = as model.lora")
    lora_r: int | None = Field(None, ge=1, description="LoRA rank of a trained reference; None = model.lora_r")

    @model_validator(mode="after")
    def _path_needed(self) -> ReferenceConfig:
        if self.mode == "path" and not self.path:
            raise ValueError("reference.mode=path needs reference.path")
        if self.mode == "checkpoint" and self.checkpoint_step >= self.start_step:
            raise ValueError(f"reference.checkpoint_step ({self.checkpoint_step}) must be below reference.start_step "
                             f"({self.start_step}): at its own step the checkpoint equals the student")
        return self

    @property
    def is_self(self) -> bool:
        """Whether the reference is the student's own weights (ema, checkpoint): no `slm reference`/`slm score`."""
        return self.mode in SELF_REFERENCE_MODES


class ScoringConfig(Section):
    mode: Literal["offline", "online"] = "offline"
    blocks: Literal["all", "used"] = Field(
        "all", description="score every train block, or only those the configured grid will read (CPU budgets)"
    )
    batch_size: PositiveInt | Literal["auto"] = Field(
        "auto", description="blocks per scoring forward: auto = 8 on CPU, on CUDA the largest power of two that fits "
        "(probed once per device, model and shape)")
    chunk_size: int = Field(
        1024, ge=1, description="at most this many tokens per LM-head chunk (a chunk also never exceeds 2^24 logits)"
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="storage dtype of ref_loss.npy (losses are computed in float32; bfloat16 is stored "
        "as its uint16 bit patterns): half the bytes of float32, selection agreement in `slm bench` case precision"
    )


class TrainConfig(Section):
    LATER_FIELDS: ClassVar[tuple[str, ...]] = ("rule", "threshold")
    # How a run is computed or stored, not what it learns: outside the run hash (engine.py).
    ENGINE_FIELDS: ClassVar[tuple[str, ...]] = ("checkpoint_every", "merge", "parallel", "gradient_checkpointing",
                                                "micro_batch_size", "compile", "report_to")

    name: str | None = Field(None, description="run name; default derives from method/ratio/seed")
    method: str = Field("clm", description="a registered method (method/registry.py METHODS, plugins included): clm "
                        "and oracle (every token / every token but the injected noise), a selection strategy (topk, "
                        "bottomk = the lowest scores, random, stochastic), an objective's control (docs/methods.md)")
    score: str = Field("excess", description="a registered score kind (SCORE_KINDS): excess (own - reference loss, "
                       "Rho-1's), loss, reference, retrospective, none, or a plugin's")
    ratio: float = Field(1.0, description="selection ratio in (0, 1]")
    rule: Literal[RULES] = Field(  # type: ignore[valid-type]
        "topk", description="how many tokens train: topk = the ratio's share of each scope unit (the paper); "
        "positive = those whose score is > 0 (TokenCleaning's rule: excess > 0); threshold = score > "
        "train.threshold. Strategy random (stochastic) then draws as many tokens at random (by its sampling): "
        "a control matched in count")
    threshold: float | None = Field(None, description="the score threshold of train.rule=threshold (nats; read by "
                                    "that rule only)")
    scope: Scope = "batch"
    temperature: float = Field(1.0, gt=0)
    stochastic: Literal[tuple(STOCHASTIC)] = Field(  # type: ignore[valid-type]
        "softmax", description="stochastic draws ∝ softmax(score / temperature), or ∝ the positive part of the "
        "score (the cs512-slm replication's variant)"
    )
    soft: bool = False
    common_random: bool = Field(
        False, description="draw the selection's random numbers from (seed, step, batch position) only, shared by "
        "every method and ratio (common random numbers); default: independent draws per run")
    steps: int = Field(60, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(5, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    max_grad_norm: float = Field(1.0, ge=0)
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="auto = bf16 on CUDA, fp32 on CPU (fp16 would need a gradient scaler: not offered)"
    )
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0, description="0 = only at the end")
    snapshot_every: int = Field(10, ge=0, description="trajectory snapshots (0 = none)")
    merge: bool = Field(
        False, description="LoRA runs: also save the adapter merged into the base model, a plain Transformers model "
        "directory with the tokenizer, in runs/<name>/merged/ (the adapter stays in runs/<name>/adapter/, loadable "
        "with PEFT's AutoPeftModelForCausalLM); a full fine-tuning run's model/ is whole already. Not with "
        "train.parallel=fsdp")
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in backward (transformers' "
        "gradient checkpointing): the memory of one layer instead of all, about a third more compute")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="engine on several processes: ddp (accelerate) or fsdp (FSDP2 per decoder layer); "
        "the result is the same, fsdp shards weights, gradients and optimizer state")
    micro_batch_size: PositiveInt | Literal["auto"] = Field(
        "auto", description="rows per forward, a multiple k of train.batch_size (the selection unit) with k dividing "
        "train.grad_accum: the same run, fewer and larger forwards. auto = train.batch_size on CPU; on CUDA the "
        "largest such k x batch_size that fits, probed once per device, model and shape")
    report_to: list[str] = Field(
        default_factory=list, description="experiment trackers that get log.jsonl's per-step "
        "scalars from the main process, through accelerate (none by default: log.jsonl holds them): tensorboard "
        "(runs/<name>/tb/, local files), "
        "wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio; 'all' = every one installed, 'none' or [] "
        "= none. Each but tensorboard is an optional install (selective-lm[wandb], selective-lm[mlflow], or the "
        "tracker's package) set up by its own environment variables (WANDB_MODE=offline, MLFLOW_TRACKING_URI, ...); "
        "the project / experiment is the out dir's name, the run the run's name")
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile every decoder layer (one static shape, no recompiles per step): auto = "
        "on CUDA only (on CPU inductor's compile costs a minute and the step is no faster)")

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        return check_ratio(v)

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, v: Any) -> list[str]:
        names = [n.strip() for n in v.split(",")] if isinstance(v, str) else list(v or [])
        names = [str(n).lower() for n in names if str(n).lower() != "none"]
        unknown = [n for n in names if n not in TRACKERS and n != "all"]
        if unknown:
            raise ValueError(f"unknown tracker {unknown[0]!r}: one or more of {', '.join(TRACKERS)}, 'all' (every one "
                             f"installed) or 'none'{did_you_mean(unknown[0], [*TRACKERS, 'all'])}")
        return list(dict.fromkeys(names))

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else safe_name(v, "run name")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        return registered("method", v, METHODS)

    @field_validator("score")
    @classmethod
    def _score(cls, v: str) -> str:
        return registered("score kind", v, SCORE_KINDS)

    @model_validator(mode="before")
    @classmethod
    def _fixed_ratio(cls, data: Any) -> Any:
        """A method that always selects one share (its paper's, `registry.Method.ratio`) runs at it, so that its
        name and hash say so whatever train.ratio was (setting train.ratio with it is refused: `load.py`)."""
        if isinstance(data, dict) and isinstance(data.get("method"), str):
            method = METHODS.get(data["method"])
            if method is not None and method.ratio is not None:
                return {**data, "ratio": method.ratio}
        return data

    @model_validator(mode="after")
    def _selects_by_something(self) -> TrainConfig:
        self.selection()  # the Selection's own checks (method/spec.py), with the config's messages
        if self.parallel == "fsdp" and self.merge:
            raise ValueError("train.merge=true cannot merge a sharded model: use train.parallel=ddp, or merge the "
                             "saved adapter after an fsdp run")
        return self

    def hashed(self, **dump: Any) -> dict[str, Any]:
        """As `Section.hashed`, without train.threshold unless train.rule=threshold reads it, and with train.score at
        its default for a method that scores by its own kind or none (CLM, the oracle, an objective): a grid's
        `train.score=retrospective` leaves its CLM run the same run, as its name."""
        out = super().hashed(**dump)
        if self.rule != "threshold":
            out.pop("threshold", None)
        if "score" in out and self.selection_rule().score != self.score:
            out["score"] = type(self).model_fields["score"].get_default()
        return out

    def run_name(self, with_seed: bool = False, reference_mode: str = "trained",
                 objective_suffixes: list[str] | None = None) -> str:
        """`train.name`, else the method's name (`clm`, `oracle`, an objective's control) or, for a selecting
        method, `<strategy>-<budget>` (budget `r<ratio>`, `pos` or `t<threshold>`; the method's name when the
        method is not its strategy's), then one suffix per identity-changing choice away from the default study's
        (`name_suffixes`, the objective's keys away from their defaults), and `-s<seed>` when several seeds run.
        Two configs that train differently never share a name, and the default study's names (`clm`,
        `topk-r0.5`, ...) stay what they were."""
        if self.name:
            return self.name
        method = METHODS[self.method]
        if not method.selects:
            name = "-".join([self.method, *(objective_suffixes or [])])
        else:
            rule = self.selection_rule()
            budget = f"r{self.ratio:g}" if self.rule == "topk" else "pos" if self.rule == "positive" \
                else f"t{self.threshold:g}"
            head = rule.strategy if method.strategy == self.method else self.method
            name = "-".join([f"{head}-{budget}", *self.name_suffixes(), *(objective_suffixes or []), *(
                [SELF_REFERENCE_SUFFIX[reference_mode]] if reference_mode in SELF_REFERENCE_SUFFIX else [])])
        return f"{name}-s{self.seed}" if with_seed else name

    def name_suffixes(self) -> list[str]:
        """The choices of a selecting run that its strategy and budget do not show: a score kind other than
        `excess` (`-loss`, `-retrospective`, ...), a scope other than `batch`, soft weights, common random numbers."""
        score = self.selection_rule().score  # a method's own score kind is in its name already
        return [*([score] if score not in ("excess", "none", METHODS[self.method].score) else []),
                *([self.scope] if self.scope != "batch" else []), *(["soft"] if self.soft else []),
                *(["crn"] if self.common_random else [])]

    def selection(self) -> Selection:
        """The run's `Selection` (method/spec.py): the value the loss reads, validated there."""
        return Selection(self.method, self.ratio, self.score, self.rule, self.threshold, self.scope, self.temperature,
                         self.soft, self.stochastic)

    def selection_rule(self) -> SelectionRule:
        """The strategy, score kind, ratio and threshold the method really uses (`Selection.rule_used`)."""
        return self.selection().rule_used

    def needs_reference(self) -> bool:
        """Whether the run reads reference losses (to select; diagnostics use them when they exist)."""
        return self.selection().needs_reference


def describe_error(err: ValidationError, tree: dict[str, Any]) -> str:
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "int", "dict")))
    msg = e["msg"].removeprefix("Value error, ")
    node: Any = tree
    for p in e["loc"]:
        node = node.get(p) if isinstance(node, dict) else None
    got = f" (got {node!r})" if node is not None and not isinstance(node, dict) and "got" not in msg else ""
    if key and msg.startswith(f"{key}."):  # a nested key named by its validator (objectives.<name>.<key>)
        return f"invalid value for {msg}"
    return f"invalid value for {key}: {msg}{got}" if key else f"{msg}{got}"
