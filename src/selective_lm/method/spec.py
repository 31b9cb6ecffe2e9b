"""`Selection`: the one frozen description of what trains, from the config (`TrainConfig.selection()`) or the
Python API (`selective_lm.Selection`) to the loss. Validated once, when it is made; the loss path reads it.

Its fields are the `train.*` keys that choose the tokens (method, score kind, rule, ratio or threshold, scope,
temperature, soft, stochastic); `rule_used` resolves them to what is applied: a method that trains every token
(CLM, the oracle, an objective of its own) selects every valid token, a strategy that ignores scores runs with
score kind `none` (unless a threshold rule counts its tokens by their scores), a threshold rule selects at ratio 1
(its count is the threshold's), a method with a fixed score kind or ratio (`registry.Method`) uses them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

from .registry import METHODS, OBJECTIVES, SCORE_KINDS, STRATEGIES, Method, lookup
from .selection import SCOPES

__all__ = ["RULES", "STOCHASTIC", "Selection", "SelectionRule"]

RULES = ("topk", "positive", "threshold")  # how many tokens a selecting run trains
STOCHASTIC = {"softmax": "stochastic", "positive": "stochastic_positive"}  # train.stochastic -> its strategy


class SelectionRule(NamedTuple):
    """What a selection applies: the strategy, the score kind, the ratio and the threshold (None: the ratio counts)."""

    strategy: str
    score: str
    ratio: float
    threshold: float | None = None


@dataclass(frozen=True)
class Selection:
    """Which tokens train, and under which objective (the method's).

    method: a METHODS key (topk, bottomk = the lowest scores, random, stochastic, clm, ... or a plugin's); ratio
    in (0, 1]: the share of each scope unit's valid tokens; score: a SCORE_KINDS key (excess = own - reference
    loss, Rho-1's); rule: topk (the ratio's count), positive (score > 0) or threshold (score > `threshold`);
    scope: batch (one ranking over the micro-batch), sequence (per row) or global (all ranks' micro-batches);
    temperature / soft / stochastic as `train.temperature`, `train.soft`, `train.stochastic`. The default is
    Rho-1's: top 60 % by excess loss over the batch.
    """

    method: str = "topk"
    ratio: float = 0.6
    score: str = "excess"
    rule: str = "topk"
    threshold: float | None = None
    scope: str = "batch"
    temperature: float = 1.0
    soft: bool = False
    stochastic: str = "softmax"

    def __post_init__(self) -> None:
        lookup("method", self.method, METHODS)
        lookup("score kind", self.score, SCORE_KINDS)
        for what, value, choices in (("rule", self.rule, RULES), ("scope", self.scope, SCOPES),
                                     ("stochastic", self.stochastic, tuple(STOCHASTIC))):
            if value not in choices:
                raise ValueError(f"train.{what} must be one of {', '.join(choices)} (got {value!r})")
        if not 0.0 < self.ratio <= 1.0:  # also rejects NaN
            raise ValueError(f"train.ratio must be in (0, 1] (got {self.ratio})")
        if not 0.0 < self.temperature < math.inf:
            raise ValueError(f"train.temperature must be positive and finite (got {self.temperature})")
        rule = self.rule_used
        if rule.strategy in ("topk", "bottomk") and rule.score == "none" and rule.ratio < 1 and not self.soft:
            raise ValueError(f"train.score=none with {rule.strategy} selection would select by position: "
                             "use train.method=random or another train.score")
        if self.rule != "topk":
            if not self.method_entry.selects:
                raise ValueError(f"train.rule={self.rule} applies to selection methods, not {self.method} "
                                 "(every token)")
            if rule.strategy == "bottomk":
                raise ValueError(f"train.rule={self.rule} selects the tokens scoring above a threshold; bottomk "
                                 "(the lowest scores) takes a ratio: use train.rule=topk with train.ratio")
            if rule.score == "none":
                raise ValueError(f"train.rule={self.rule} counts the tokens whose score exceeds a threshold: "
                                 "train.score=none gives none")
            if self.soft:
                raise ValueError(f"train.soft weighs a ratio's tokens: use train.rule=topk, not {self.rule}")
        if self.rule == "threshold" and self.threshold is None:
            raise ValueError("train.rule=threshold needs train.threshold (the score above which tokens train)")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"train.threshold must be finite (got {self.threshold})")

    @property
    def method_entry(self) -> Method:
        return METHODS[self.method]

    @property
    def rule_used(self) -> SelectionRule:
        """The strategy, score kind, ratio and threshold the method really uses (module docstring)."""
        strategy = self.method_entry.strategy
        if strategy is None:
            return SelectionRule("topk", "none", 1.0)
        if strategy == "stochastic":
            strategy = STOCHASTIC[self.stochastic]
        threshold = {"topk": None, "positive": 0.0, "threshold": self.threshold}[self.rule]
        score = self.method_entry.score or self.score
        score = score if STRATEGIES[strategy].uses_scores or threshold is not None else "none"
        # A method's fixed ratio (its paper's) replaces any below 1; at ratio 1 every method trains every token
        # (`every_token`, a self-reference's warm-up).
        fixed = self.method_entry.ratio
        ratio = fixed if fixed is not None and self.ratio < 1 else self.ratio
        return SelectionRule(strategy, score, ratio if threshold is None else 1.0, threshold)

    @property
    def objective(self) -> str:
        return self.method_entry.objective

    @property
    def needs(self) -> frozenset[str]:
        """What a run of it reads (registry.NEEDS): its score kind's, when it uses one, and its objective's."""
        return SCORE_KINDS[self.rule_used.score].needs | OBJECTIVES[self.objective].needs

    @property
    def needs_reference(self) -> bool:
        """Whether the run reads reference losses (stored scores, an online or a self-reference): its score kind
        does, or its objective (one that weighs every token by its excess loss)."""
        return "reference_loss" in self.needs

    def every_token(self) -> Selection:
        """The same run training every valid token (a self-reference's warm-up): any strategy at ratio 1 keeps
        every token, with score kind `none` nothing is read."""
        return dataclasses.replace(self, ratio=1.0, score="none", rule="topk", threshold=None, soft=False)
