"""Typed configuration: one section per stage, composed into one `Config`.

Load order (as OLMo and torchtune do): defaults in code → preset YAML → `--config FILE.yaml`
→ dotted `key=value` overrides. Every mistake becomes a `UserError` naming the key and what
it accepts, so the CLI can exit 2 with one line instead of a pydantic traceback.
"""

from __future__ import annotations

import copy
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from .corpora import CORPORA
from .errors import UserError, did_you_mean, first_line
from .selection import NEEDS_REFERENCE, SCOPES, SCORE_KINDS, STRATEGIES

DEFAULT_PRESET = "champ-smollm2"
LORA_ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPLITS = ("reference", "train", "val_clean", "val_noisy")


# Choices read from the registries: a new strategy, score kind or corpus needs no change here.
BASELINE_METHODS = ("clm", "oracle")  # CLM on every token / on every token but the injected noise
DISTILL = "distill"  # CLM on every token plus KL towards the reference's next-token distribution (a control)
EVERY_TOKEN_METHODS = (*BASELINE_METHODS, DISTILL)  # train every (trainable) token: no selection
Method = Literal[(*EVERY_TOKEN_METHODS, *STRATEGIES)]  # type: ignore[valid-type]
Strategy = Literal[tuple(STRATEGIES)]  # type: ignore[valid-type]
GridMethod = Literal[(*STRATEGIES, DISTILL)]  # type: ignore[valid-type]
ScoreKind = Literal[tuple(SCORE_KINDS)]  # type: ignore[valid-type]
Scope = Literal[SCOPES]  # type: ignore[valid-type]

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _safe_name(value: str, what: str) -> str:
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
        description="cap on tokens per split: one number for all, or split -> tokens",
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
        "reference_mix=0.5: 2.5x the 20k that the default reference training reads (40 steps x 4 x 128), while "
        "train keeps 60 % of the problems (162), more than enough for its 300k tokens"
    )
    annotated_share: float = Field(
        0.0, ge=0.0, lt=1.0, description="CHAMP: share of the train and val_noisy text taken from the "
        "conversations whose first wrong step CHAMP annotates (token kinds after_wrong_step / before_wrong_step), "
        "interleaved with the others from the start of the split until they run out: 0.25 puts about 2.6k of their "
        "tokens in the default study's 20k trained and 8 documents in val_noisy's evaluation; 0 (the default until "
        "the default study is remeasured with them) = their natural share (about 3 %: 540 of 19,440 conversations)")
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
            _safe_name(split, "split")
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
        return out

    def cap(self, split: str) -> int | None:
        """Token cap of one split (None = no cap)."""
        if isinstance(self.max_tokens, dict):
            return self.max_tokens.get(split)
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


class SelectionRule(NamedTuple):
    """What a run's selection really does: its strategy, score kind, ratio, and the score threshold that
    sets the count instead of the ratio (rules positive and threshold; None: the ratio's count)."""

    strategy: str
    score: str
    ratio: float
    threshold: float | None = None


RULES = ("topk", "positive", "threshold")  # how many tokens a selecting run trains (TrainConfig.rule)


class TrainConfig(Section):
    LATER_FIELDS: ClassVar[tuple[str, ...]] = ("rule", "threshold", "kd_weight", "kd_temperature")
    # How a run is computed or stored, not what it learns: outside the run hash (engine.py).
    ENGINE_FIELDS: ClassVar[tuple[str, ...]] = ("checkpoint_every", "merge", "parallel", "gradient_checkpointing",
                                                "micro_batch_size", "compile")

    name: str | None = Field(None, description="run name; default derives from method/ratio/seed")
    method: Method = Field("clm", description="clm, oracle, distill (every token: CLM + train.kd_weight x KL towards "
                           "the reference's next-token distribution), or a selection strategy (selection.STRATEGIES: "
                           "topk, bottomk = the lowest scores, random, stochastic)")
    score: ScoreKind = "excess"
    ratio: float = Field(1.0, description="selection ratio in (0, 1]")
    rule: Literal[RULES] = Field(  # type: ignore[valid-type]
        "topk", description="how many tokens train: topk = the ratio's share of each scope unit (the paper); "
        "positive = those whose score is > 0 (TokenCleaning's rule: excess > 0); threshold = score > "
        "train.threshold. Strategy random (stochastic) then draws as many tokens at random (by its sampling): "
        "a control matched in count")
    threshold: float | None = Field(None, description="the score threshold of train.rule=threshold (nats; read by "
                                    "that rule only)")
    kd_weight: float = Field(1.0, ge=0.0, allow_inf_nan=False, description="train.method=distill: weight of "
                             "KL(reference || student) beside the CE of every token (0 = CLM with the reference's "
                             "cost)")
    kd_temperature: float = Field(1.0, gt=0.0, allow_inf_nan=False, description="train.method=distill: both "
                                  "distributions at logits / T, the KL times T² (Hinton et al.'s scaling)")
    scope: Scope = "batch"
    temperature: float = Field(1.0, gt=0)
    stochastic: Literal["softmax", "positive"] = Field(
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
    merge: bool = False
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
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile every decoder layer (one static shape, no recompiles per step): auto = "
        "on CUDA only (on CPU inductor's compile costs a minute and the step is no faster)")

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not (0.0 < v <= 1.0) or math.isnan(v):
            raise ValueError(f"must be in (0, 1] (got {v})")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else _safe_name(v, "run name")

    @model_validator(mode="after")
    def _selects_by_something(self) -> TrainConfig:
        rule = self.selection_rule()
        if rule.strategy in ("topk", "bottomk") and rule.score == "none" and rule.ratio < 1 and not self.soft:
            raise ValueError(f"train.score=none with {rule.strategy} selection would select by position: "
                             "use train.method=random or another train.score")
        if self.rule != "topk":
            if self.method == DISTILL:
                raise ValueError(f"train.rule={self.rule} applies to selection methods, not distill (every token)")
            if self.method == "bottomk":
                raise ValueError(f"train.rule={self.rule} selects the tokens scoring above a threshold; bottomk "
                                 "(the lowest scores) takes a ratio: use train.rule=topk with train.ratio")
            if self.method in BASELINE_METHODS:
                raise ValueError(f"train.rule={self.rule} applies to selection methods, not {self.method}")
            if rule.score == "none":
                raise ValueError(f"train.rule={self.rule} counts the tokens whose score exceeds a threshold: "
                                 "train.score=none gives none")
            if self.soft:
                raise ValueError(f"train.soft weighs a ratio's tokens: use train.rule=topk, not {self.rule}")
        if self.rule == "threshold" and self.threshold is None:
            raise ValueError("train.rule=threshold needs train.threshold (the score above which tokens train)")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"train.threshold must be finite (got {self.threshold})")
        if self.parallel == "fsdp" and self.merge:
            raise ValueError("train.merge=true cannot merge a sharded model: use train.parallel=ddp, or merge the "
                             "saved adapter after an fsdp run")
        return self

    def hashed(self, **dump: Any) -> dict[str, Any]:
        """As `Section.hashed`, without train.threshold unless train.rule=threshold reads it."""
        out = super().hashed(**dump)
        if self.rule != "threshold":
            out.pop("threshold", None)
        if self.method != DISTILL:
            out.pop("kd_weight", None)
            out.pop("kd_temperature", None)
        return out

    def run_name(self, with_seed: bool = False, reference_mode: str = "trained") -> str:
        """`train.name`, else `clm`, `oracle` or `<strategy>-<budget>` (budget `r<ratio>`, `pos` or
        `t<threshold>`), then one suffix per identity-changing choice away from the default study's (`name_suffixes`),
        and `-s<seed>` when several seeds run. Two configs that select differently never share a name, and the
        default study's names (`clm`, `topk-r0.5`, ...) stay what they were."""
        if self.name:
            return self.name
        if self.method in BASELINE_METHODS:
            name = self.method
        elif self.method == DISTILL:  # `distill`, with -w<weight> / -T<temperature> away from 1
            name = "-".join([DISTILL, *([f"w{self.kd_weight:g}"] if self.kd_weight != 1 else []),
                             *([f"T{self.kd_temperature:g}"] if self.kd_temperature != 1 else [])])
        else:
            rule = self.selection_rule()
            budget = f"r{self.ratio:g}" if self.rule == "topk" else "pos" if self.rule == "positive" \
                else f"t{self.threshold:g}"
            name = "-".join([f"{rule.strategy}-{budget}", *self.name_suffixes(), *(
                [SELF_REFERENCE_SUFFIX[reference_mode]] if reference_mode in SELF_REFERENCE_SUFFIX else [])])
        return f"{name}-s{self.seed}" if with_seed else name

    def name_suffixes(self) -> list[str]:
        """The choices of a selecting run that its strategy and budget do not show: a score kind other than
        `excess` (`-loss`, `-retrospective`, ...), a scope other than `batch`, soft weights, common random numbers."""
        score = self.selection_rule().score
        return [*([score] if score not in ("excess", "none") else []),
                *([self.scope] if self.scope != "batch" else []), *(["soft"] if self.soft else []),
                *(["crn"] if self.common_random else [])]

    def selection_rule(self) -> SelectionRule:
        """The strategy, score kind, ratio and threshold the method really uses: CLM and the oracle select
        every (trainable) token; a strategy that ignores scores runs with score kind `none`, unless a threshold
        rule counts its tokens by their scores. Threshold rules select at ratio 1 (their count is the threshold's)."""
        if self.method in EVERY_TOKEN_METHODS:
            return SelectionRule("topk", "none", 1.0)
        strategy = "stochastic_positive" if self.method == "stochastic" and self.stochastic == "positive" \
            else self.method
        threshold = {"topk": None, "positive": 0.0, "threshold": self.threshold}[self.rule]
        score = self.score if STRATEGIES[strategy].uses_scores or threshold is not None else "none"
        return SelectionRule(strategy, score, self.ratio if threshold is None else 1.0, threshold)

    def needs_reference(self) -> bool:
        """Whether the run reads reference losses (to select; diagnostics use them when they exist)."""
        return self.selection_rule().score in NEEDS_REFERENCE


class EvalConfig(Section):
    splits: list[str] = Field(default_factory=lambda: ["val_clean", "val_noisy"])

    @field_validator("splits")
    @classmethod
    def _splits(cls, v: list[str]) -> list[str]:
        return [_safe_name(x, "split") for x in v]

    batch_size: PositiveInt | Literal["auto"] = Field(
        "auto", description="blocks per evaluation forward (perplexity, learning curve, tasks): auto = 8 on CPU, on "
        "CUDA the largest power of two that fits")
    max_tokens: int | None = Field(
        None, ge=1, description="evaluate about this many tokens of each split, in blocks spread over every "
        "document (None = all)")
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
        return TrainConfig._ratio(v)


class ExportConfig(Section):
    """`slm export-selected`: the selection as JSONL (text and spans) or as a `datasets` directory for any trainer."""

    format: Literal["jsonl", "hf"] = Field(
        "jsonl", description="jsonl: selected.jsonl, one document per line; hf: selected_hf/, a datasets directory "
        "of blocks (input_ids, labels = -100 on unselected tokens, attention_mask)")
    blocks: Literal["scored", "all"] = Field(
        "scored", description="with a partial score store (scoring.blocks=used, as `make run` makes it): scored = "
        "export the blocks that have reference losses, all = score the missing blocks with the reference first")


class GridConfig(Section):
    methods: list[GridMethod] = Field(
        default_factory=lambda: ["topk", "random", "stochastic"], description="the grid's methods besides CLM and "
        "the oracle: selection strategies, run at every ratio of grid.ratios (bottomk: the sign check), and "
        "distill, run once (it trains every token)")
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
            TrainConfig._ratio(r)
        return v


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

    @model_validator(mode="after")
    def _distill_has_a_reference(self) -> Config:
        if DISTILL in (self.train.method, *self.grid.methods) and self.reference.is_self:
            raise ValueError(f"train.method=distill distills a reference model's next-token distribution, but "
                             f"reference.mode={self.reference.mode} is the student's own weights: use reference.mode "
                             "trained, path or self")
        return self

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
        if DISTILL in self.grid.methods:  # once: it trains every token
            specs.append({"method": DISTILL, **baseline})
        selecting = [m for m in self.grid.methods if m != DISTILL]
        for rule in self.grid.rules:
            threshold = self.train.threshold if rule == "threshold" else None
            ratios = self.grid.ratios if rule == "topk" else [1.0]  # the threshold sets the count
            specs += [{"method": m, "ratio": r, "rule": rule, "threshold": threshold}
                      for m in selecting for r in ratios]
        runs: dict[str, Config] = {}
        for seed in range(self.train.seed, self.train.seed + self.grid.seeds):
            for spec in specs:
                try:
                    t = TrainConfig.model_validate({**self.train.model_dump(), **spec, "seed": seed, "name": None})
                except ValidationError as e:
                    label = spec["method"] if spec["method"] in EVERY_TOKEN_METHODS else \
                        f"{spec['method']} ({spec['rule']})"
                    raise UserError(f"grid run {label}: {_describe_error(e, {})}") from None
                run = self.model_copy(update={"train": t})
                runs[run.run_name(with_seed=self.grid.seeds > 1)] = run
        return runs

    def run_name(self, with_seed: bool = False) -> str:
        """The run's directory name under runs/ (`TrainConfig.run_name`, with `-ema` / `-ckpt` when a
        self-reference selects it)."""
        return self.train.run_name(with_seed, reference_mode=self.reference.mode)

    def artifact_settings(self) -> dict[str, Any]:
        """Dotted key -> value of the settings that shape what an out dir stores besides its runs: the token
        stores (data.*, the model's tokenizer), the base model every run starts from (model.*), the reference
        model and its score store (the reference.* its mode reads, scoring.dtype / scoring.blocks) when the
        reference is a stored one. Runs are told apart by their names and config hashes instead, and engine
        settings (train.*) never count: `outconfig` compares these with the out dir's stored config."""
        flat = {f"data.{k}": v for k, v in self.data.model_dump(mode="json").items()}
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


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("selective_lm.presets").iterdir()
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
    text = resources.files("selective_lm.presets").joinpath(f"{name}.yaml").read_text()
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


VALID_KEYS = _leaf_keys(Config)


def _check_keys(tree: dict[str, Any], origin: str, prefix: str = "") -> None:
    """Reject unknown keys, naming the closest valid one."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if dotted in VALID_KEYS:
            continue
        if isinstance(value, dict) and any(k.startswith(dotted + ".") for k in VALID_KEYS):
            _check_keys(value, origin, dotted + ".")
            continue
        raise UserError(f"unknown config key {dotted!r} in {origin}{did_you_mean(dotted, VALID_KEYS, cutoff=0.5)}")


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


def _describe_error(err: ValidationError, tree: dict[str, Any]) -> str:
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "int", "dict")))
    msg = e["msg"].removeprefix("Value error, ")
    node: Any = tree
    for p in e["loc"]:
        node = node.get(p) if isinstance(node, dict) else None
    got = f" (got {node!r})" if node is not None and not isinstance(node, dict) and "got" not in msg else ""
    return f"invalid value for {key}: {msg}{got}" if key else f"{msg}{got}"


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
        _check_keys(file_layer, f"config file {config_file}")
    if base is not None:
        _check_keys(base, "the out dir's stored config")
        name, lower_layer = str(base.get("preset", DEFAULT_PRESET)), base
    else:
        name = preset or str(file_layer.get("preset", DEFAULT_PRESET))
        lower_layer = _preset(name)
        _check_keys(lower_layer, f"preset {name}")
    lower = _merge(_merge(Config().to_dict(), lower_layer), {"preset": name})
    tree = copy.deepcopy(_merge(lower, file_layer))
    override_tree: dict[str, Any] = {}
    for item in overrides:
        key, value = parse_override(item)
        _check_keys(_nest(key, value), "overrides")
        _set_dotted(tree, key, value)
        _set_dotted(override_tree, key, value)
    user = set(leaves(file_layer)) | set(leaves(override_tree))
    _corpus_defaults(tree, user | set(leaves(lower_layer)))
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        raise UserError(_describe_error(e, tree)) from None
    before = leaves(lower)
    _ignored(cfg, {k for k, v in leaves(tree).items() if k in user and v != before.get(k)})
    return cfg


def leaves(tree: dict[str, Any]) -> dict[str, Any]:
    """Dotted key -> value of the config keys `tree` sets."""
    out: dict[str, Any] = {}
    for key in VALID_KEYS:
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


def _ignored(cfg: Config, explicit: set[str]) -> None:
    """UserError for the first of the options set by the user (`explicit`: set by the config file or the overrides,
    to another value than the preset's) that would have no effect, naming what it would need."""
    t, r, d = cfg.train, cfg.reference, cfg.data

    def no_effect(key: str, why: str) -> UserError:
        value = leaves(cfg.to_dict()).get(key)
        return UserError(f"{key}={value} has no effect {why}")

    if "train.threshold" in explicit and "threshold" not in {t.rule, *cfg.grid.rules}:
        raise no_effect("train.threshold", f"with train.rule={t.rule}: it is read by train.rule=threshold "
                        "(or grid.rules with threshold) only")
    for key in sorted(k for k in ("train.kd_weight", "train.kd_temperature") if k in explicit):
        if DISTILL not in (t.method, *cfg.grid.methods):
            raise no_effect(key, f"with train.method={t.method}: it is read by train.method=distill (or grid.methods "
                            "with distill) only")
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
