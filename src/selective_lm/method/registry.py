"""The registries a researcher adds to: score kinds, selection strategies, objectives, and the methods
(`train.method`) made of them. Each entry declares its contract, so that the config, the trainer, `slm
analyze` and `slm report` read what it needs and what it is from here, never from lists of names.

- A **score kind** maps what the step knows of each token (`TokenView`) to a score `[B, T]`, higher = train
  it, and declares its `needs` (`NEEDS`): the reference's losses, the student's logits (entropy), the
  reference's distribution, a history model.
- A **strategy** turns scores and a validity mask into a mask (or soft weights): `selection.py`.
- An **objective** is the loss of one micro-batch (`loss.Batch` in, `loss.SelectiveLoss` out), computed
  inside the wrapped module's forward so that DDP and FSDP see an ordinary forward/backward. It declares its
  `needs`, its config keys (a pydantic model: `objectives.<name>.<key>`) and whether its logged loss is
  the plain cross-entropy of the trained tokens (the figure comparable across runs).
- A **method** is what `train.method` and `grid.methods` name: a strategy (or every trainable token), an
  objective, and its role in a study. Registering a strategy or an objective registers the method of the
  same name; `register_method` composes others. A `control` names the pair it is compared on, so that
  `slm analyze` computes its paired intervals and `slm report` prints them without knowing it.

Registration refuses a name that is taken (a plugin cannot shadow a built-in). Plugins register from their
own file (`config/plugins.py`, docs/add-a-method.md); the entries record where they came from, so that an
error names the plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, NamedTuple, TypeVar

from torch import Tensor

from ..errors import did_you_mean

if TYPE_CHECKING:
    from pydantic import BaseModel

    from .loss import Batch, SelectiveLoss

__all__ = ["METHODS", "NEEDS", "OBJECTIVES", "ROLES", "SCORE_KINDS", "STRATEGIES", "Method", "Objective",
           "Registry", "ScoreKind", "Strategy", "TokenView", "lookup", "register_method", "register_objective",
           "register_score", "register_strategy", "registering_from"]

V = TypeVar("V")
# Lazily drawn Gumbel(0, 1) noise `[B, T]` (zero at invalid positions): topk draws nothing.
Noise = Callable[[], Tensor]

# What an entry can ask of a run. reference_loss: the reference's per-token losses (stored scores, an online
# reference or a self-reference); student_logits: the student's next-token distribution in the step (its
# entropy); reference_logits: the reference model's distribution in the step (loaded and run online);
# history: the student's own earlier weights (reference.mode ema, checkpoint or self).
NEEDS = ("reference_loss", "student_logits", "reference_logits", "history")
ROLES = ("baseline", "method", "control")
OUTCOMES = ("beats", "loses to")  # a control's run vs its pair, on every validation split


def lookup(what: str, name: str, registry: dict[str, V]) -> V:
    """`registry[name]`, or a ValueError that suggests the closest name."""
    if name in registry:
        return registry[name]
    raise ValueError(f"unknown {what} {name!r}{did_you_mean(name, registry)} (choices: {', '.join(registry)})")


class Registry(dict[str, V], Generic[V]):
    """A name -> entry mapping that refuses to overwrite, and remembers who registered each entry."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what
        self.origins: dict[str, str] = {}

    def add(self, name: str, entry: V, origin: str) -> V:
        if not name.isidentifier():
            raise ValueError(f"{self.what} name {name!r} must be an identifier (letters, digits, _)")
        if name in self:
            raise ValueError(f"{self.what} {name!r} is already registered by {self.origins[name]}")
        self[name] = entry
        self.origins[name] = origin
        return entry

    def get_entry(self, name: str) -> V:
        return lookup(self.what, name, self)


def _check_needs(needs: Iterable[str], what: str) -> frozenset[str]:
    unknown = sorted(set(needs) - set(NEEDS))
    if unknown:
        raise ValueError(f"{what} needs {unknown[0]!r}, which is not one of {', '.join(NEEDS)}")
    return frozenset(needs)


def default_suffixes(params: BaseModel) -> list[str]:
    """`<key><value>` for each of an objective's params away from its default, in field order."""
    return [f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}"
            for k, v in params.model_dump(exclude_defaults=True).items()]


class TokenView(NamedTuple):
    """What the step knows of each token when it scores, every tensor `[B, T]` without grad, NaN where no
    target: the student's own loss, the reference's loss (None unless a need asks for it), the student's
    entropy over its next-token distribution (None unless `student_logits` is needed), the reference's (None
    unless `reference_logits` is needed)."""

    loss: Tensor
    ref_loss: Tensor | None = None
    entropy: Tensor | None = None
    ref_entropy: Tensor | None = None


@dataclass(frozen=True)
class ScoreKind:
    """fn: `TokenView` -> scores `[B, T]` (higher = train it); needs: a subset of NEEDS."""

    fn: Callable[[TokenView], Tensor]
    needs: frozenset[str] = frozenset()
    doc: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs", _check_needs(self.needs, "a score kind"))


@dataclass(frozen=True)
class Strategy:
    """keys: ranking keys, most significant first, each `[B, T]` (scores, noise, temperature -> keys);
    log_weights: `[B, T]` for soft mode; uses_scores: False when the strategy ignores the scores (a run of it
    then needs no reference)."""

    keys: Callable[[Tensor, Noise, float], tuple[Tensor, ...]]
    log_weights: Callable[[Tensor, float], Tensor]
    uses_scores: bool = True
    doc: str = ""


@dataclass(frozen=True)
class Objective:
    """loss: the micro-batch's loss (`loss.Batch`, the objective's validated params or None) -> `SelectiveLoss`.

    needs: a subset of NEEDS (`reference_logits`: the trainer runs the reference model in the step and hands
    its final hidden states and head over in `Batch.reference`); params: a pydantic model of the objective's
    config keys (`objectives.<name>.<key>`), None without keys; logs_ce: the logged loss is the mean CE of the
    trained tokens (`SelectiveLoss.loss_selected`), not `loss_sum`, e.g. when the objective adds other terms;
    suffixes: the run name's suffixes for params away from their defaults (default `<key><value>`); renamed: the
    dotted keys its params had before (old key -> param), so that an out dir stored by an earlier version loads."""

    loss: Callable[[Batch, Any], SelectiveLoss]
    needs: frozenset[str] = frozenset()
    params: type[BaseModel] | None = None
    logs_ce: bool = False
    doc: str = ""
    suffixes: Callable[[Any], list[str]] = default_suffixes
    renamed: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs", _check_needs(self.needs, "an objective"))


@dataclass(frozen=True)
class Method:
    """What `train.method` names. strategy: a STRATEGIES key, or None for every trainable token (no selection);
    objective: an OBJECTIVES key; role: baseline (CLM, the oracle), method, or control (a run that could refute a
    method); compare: for a control, the (a, b) methods whose paired Δ of a vs b `slm analyze` computes, same seed
    (and same ratio and rule when both select; None: the report's main table pairs it by count); question: what
    that comparison asks, for the report; conclusions: what it means when a `beats` or `loses to` b on every
    validation split (the report adds it; other outcomes get none); oracle: every token but the injected noise;
    in_default_grid: in `grid.methods`'s default (the full grid); score: the score kind the method always selects
    by (a SCORE_KINDS key, e.g. the student's entropy for the 80/20 rule), None for `train.score`'s; ratio: the
    share the method always selects (its paper's, e.g. the 80/20 rule's 0.2; a grid runs it once, at it), None
    for `train.ratio`'s."""

    strategy: str | None
    objective: str = "ce"
    score: str | None = None
    ratio: float | None = None
    role: Literal["baseline", "method", "control"] = "method"
    compare: tuple[str, str] | None = None
    question: str = ""
    conclusions: Mapping[str, str] = field(default_factory=dict)
    oracle: bool = False
    in_default_grid: bool = False
    doc: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"a method's role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.compare is not None and self.role != "control":
            raise ValueError("only a control names a pair it is compared on (compare=(a, b))")
        if set(self.conclusions) - set(OUTCOMES) or (self.conclusions and self.compare is None):
            raise ValueError(f"conclusions: a control's outcomes ({', '.join(OUTCOMES)}) -> what each means")
        if self.score is not None and self.strategy is None:
            raise ValueError("a method that trains every token selects by no score (score=None)")
        if self.ratio is not None and (self.strategy is None or not 0.0 < self.ratio <= 1.0):
            raise ValueError(f"a method's fixed ratio applies to a strategy and must be in (0, 1], got {self.ratio}")

    @property
    def needs(self) -> frozenset[str]:
        """The objective's needs (a score kind's are the run's `train.score`'s)."""
        return OBJECTIVES[self.objective].needs

    @property
    def selects(self) -> bool:
        """Whether the run selects tokens (a strategy at a ratio or rule), or trains every trainable token."""
        return self.strategy is not None


SCORE_KINDS: Registry[ScoreKind] = Registry("score kind")
STRATEGIES: Registry[Strategy] = Registry("selection strategy")
OBJECTIVES: Registry[Objective] = Registry("objective")
METHODS: Registry[Method] = Registry("method")


_ORIGIN = ["selective_lm (built-in)"]  # who is registering now: the package, or the plugin being loaded


@contextmanager
def registering_from(origin: str) -> Iterator[None]:
    """Record every registration made inside as coming from `origin` (a plugin, `config/plugins.py`)."""
    _ORIGIN.append(origin)
    try:
        yield
    finally:
        _ORIGIN.pop()


def _origin(origin: str | None) -> str:
    return origin or _ORIGIN[-1]


def register_score(name: str, kind: ScoreKind, *, origin: str | None = None) -> ScoreKind:
    """Add a score kind: `train.score=<name>`."""
    return SCORE_KINDS.add(name, kind, _origin(origin))


def register_strategy(name: str, strategy: Strategy, *, method: Method | None | bool = True,
                      origin: str | None = None) -> Strategy:
    """Add a strategy, and the method of the same name (`train.method=<name>`: cross-entropy on the tokens it
    selects) unless `method=False`; pass a `Method` to set its role."""
    STRATEGIES.add(name, strategy, _origin(origin))
    if method is not False:
        register_method(name, method if isinstance(method, Method) else Method(strategy=name), origin=origin)
    return strategy


def register_objective(name: str, objective: Objective, *, method: Method | None | bool = True,
                       origin: str | None = None) -> Objective:
    """Add an objective, and the method of the same name (every trainable token under it) unless
    `method=False`; pass a `Method` to set its role or strategy."""
    OBJECTIVES.add(name, objective, _origin(origin))
    if method is not False:
        register_method(name, method if isinstance(method, Method) else Method(strategy=None, objective=name),
                        origin=origin)
    return objective


def register_method(name: str, method: Method, *, origin: str | None = None) -> Method:
    """Add a method: `train.method=<name>`, usable in `grid.methods`; its strategy and objective must exist."""
    if method.strategy is not None:
        lookup("selection strategy", method.strategy, STRATEGIES)
    if method.score is not None:
        lookup("score kind", method.score, SCORE_KINDS)
    lookup("objective", method.objective, OBJECTIVES)
    return METHODS.add(name, method, _origin(origin))
