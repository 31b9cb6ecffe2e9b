"""Selection by the student's own per-token statistics, online, with no reference model: the score kind `entropy`
and the methods of two papers that rank by it (or by the student's loss), each the `topk` strategy with a fixed
score kind (`registry.Method.score`).

- `entropy_topk`, the 80/20 rule: Wang et al., "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive
  Effective Reinforcement Learning for LLM Reasoning" (NeurIPS 2025, arXiv 2506.01939) keep the policy gradient of
  the 20 % of a batch's tokens with the highest entropy of the policy's next-token distribution (and report that
  the other 80 % alone do markedly worse: `train.method=bottomk train.score=entropy train.ratio=0.8`). Here: the
  cross-entropy of the 20 % of each selection unit's tokens with the highest student entropy. The paper's share
  is the method's (`Method.ratio`): a grid runs it at 0.2 whatever grid.ratios says; `train.method=topk
  train.score=entropy` selects any other share.
- `eslm` and `eslm_loss`, ESLM: Bal, Cevher and Muehlebach, "ESLM: Risk-Averse Selective Language Modeling for
  Efficient Pretraining" (arXiv 2505.19893) score each token of a batch by the student's entropy or its loss,
  and keep the tokens whose score is above the batch's value-at-risk at confidence α (its empirical α-quantile);
  with the loss, the mean loss of the kept tokens is the batch's CVaR_α. Keeping the scores above the α-quantile
  is keeping the top 1 − α share: here α = 1 − train.ratio, and the count is the ratio's (`selection.py`: round
  half up, at least one) where the strict quantile would keep floor((1 − α) n), at most one token more per
  selection unit; a tie at the quantile goes to the earlier position instead of out. The paper's α for its
  experiments could not be read here (docs/methods-side-by-side.md): the ratio is the study's.

At the same ratio `eslm` and `entropy_topk` select the same tokens (the same rule on the same score); the two
papers differ in their setting (pretraining vs reinforcement learning) and their share. The entropy is computed
only for a score kind that needs it (`student_logits`: `loss.Batch.score`), from the step's own hidden states,
without grad: one more pass of the head over the rows, no other forward.
"""

from __future__ import annotations

from torch import Tensor

from .registry import Method, ScoreKind, TokenView, register_method, register_score

__all__: list[str] = []


def _entropy(view: TokenView) -> Tensor:
    """The student's next-token entropy (nats) at each target position: higher = more uncertain = train it."""
    if view.entropy is None:  # `selection.scores` hands it over for a kind that needs student_logits
        raise ValueError("score kind 'entropy' needs the student's entropy (entropy)")
    return view.entropy


register_score("entropy", ScoreKind(
    _entropy, frozenset({"student_logits"}),
    "the student's entropy over its next-token distribution (the 80/20 rule's and ESLM's uncertainty; no reference)"))

register_method("entropy_topk", Method(
    strategy="topk", score="entropy", ratio=0.2,
    doc="the 20 % of tokens with the highest student entropy (the 80/20 rule, Wang et al. 2025)"))
register_method("eslm", Method(
    strategy="topk", score="entropy",
    doc="ESLM's entropy variant: the tokens above the batch's value-at-risk of the student's entropy, "
    "α = 1 - train.ratio (Bal et al. 2025)"))
register_method("eslm_loss", Method(
    strategy="topk", score="loss",
    doc="ESLM's loss variant: the tokens above the batch's value-at-risk of the student's loss, α = 1 - train.ratio "
    "(their mean loss is the batch's CVaR; Bal et al. 2025)"))
