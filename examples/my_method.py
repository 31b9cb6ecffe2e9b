"""A token-selection method from outside the package: one file, a strategy, a score kind and an objective.

Train it beside CLM on the smoke preset (a tiny random model, a few minutes of CPU), with this file named by
its path:

    slm run --preset smoke --plugins examples/my_method.py grid.methods=[my_focal] --out out/my-method

`results.json`, `report.md` and the curves then hold `my_focal-r0.5` and `my_focal-r0.3` (the smoke grid's
ratios) beside CLM and the oracle; add `topk` to `grid.methods` to set it beside Rho-1. What it adds:

- score kind `my_surprise`: the student's loss minus its entropy, the surprise of the token beyond the surprise
  the student expected (its own predictive entropy). It needs the student's logits (`student_logits`), no
  reference model: the trainer computes the entropy in the step, only for runs whose score kind asks for it.
- strategy `my_abs_topk`: the tokens whose score is farthest from 0, either side (the most surprising and the
  most anticipated). Registering a strategy also registers the method of its name (CE on what it keeps):
  `train.method=my_abs_topk train.score=my_surprise`.
- objective `my_focal`: the focal loss of Lin et al. (ICCV 2017), (1 - p)^gamma x CE, on the selected tokens,
  with its config key `objectives.my_focal.gamma` (validated, default 2). The method `my_focal` combines the
  three: keep the 60 % (`train.ratio`) of tokens of largest |surprise|, train them with the focal loss.

In your own training loop (Hugging Face's Trainer), import this file and name its strategy and score kind;
objectives run in `slm train` (they see the model's hidden states, which the HF Trainer's loss does not):

    import my_method  # registers its entries
    from selective_lm import Selection, SelectiveTrainer
    trainer = SelectiveTrainer(..., selection=Selection(method="my_abs_topk", score="my_surprise", ratio=0.6))

How to write one, and the contract of each registry: docs/add-a-method.md.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from selective_lm.method import (
    Batch,
    Method,
    Objective,
    ScoreKind,
    SelectiveLoss,
    Strategy,
    TokenView,
    finite_or_nan,
    register_objective,
    register_score,
    register_strategy,
    selected_sum,
    selection_result,
    token_losses,
)


def surprise(view: TokenView) -> Tensor:
    """loss - entropy `[B, T]`: > 0 where the token surprised the student more than it expected (NaN: no target)."""
    return view.loss - view.entropy


register_score("my_surprise", ScoreKind(surprise, frozenset({"student_logits"}),
                                        doc="the student's loss minus its entropy (surprise beyond expectation)"))


register_strategy("my_abs_topk", Strategy(
    keys=lambda scores, noise, temperature: (scores.abs(),),  # ranking keys, most significant first
    log_weights=lambda scores, temperature: scores.abs() / temperature,  # train.soft: weights ∝ exp(|s| / T)
    doc="the scores farthest from 0, either side"))


class FocalParams(BaseModel):
    """`objectives.my_focal.*`: validated when the config is, documented by `slm config`."""

    model_config = ConfigDict(extra="forbid")
    gamma: float = Field(2.0, ge=0.0, description="focusing exponent: (1 - p)^gamma x CE (0 = CE)")


def focal_loss(batch: Batch, params: FocalParams) -> SelectiveLoss:
    """Forward, score, select, then the focal loss of the selected tokens (with grad through the factor too)."""
    hidden, head = batch.forward()
    ce = token_losses(hidden, head, batch.input_ids, batch.valid, chunk_size=batch.chunk_size)  # [B, T], NaN: none
    own = ce.detach()
    s = batch.score(own, hidden, head)  # the run's score kind: what it needs is computed here
    chosen = batch.select(s)  # the run's strategy, ratio and scope: a mask (or soft weights)
    focal = (1 - torch.exp(-ce)) ** params.gamma * ce
    return selection_result(finite_or_nan(selected_sum(focal, chosen), s, batch.valid), own, s, chosen, batch.valid)


register_objective("my_focal", Objective(
    focal_loss, params=FocalParams,
    logs_ce=True,  # log the plain CE of the trained tokens: the figure comparable with CLM's
    doc="focal loss (1 - p)^gamma x CE on the selected tokens"),
    method=Method(strategy="my_abs_topk", objective="my_focal", score="my_surprise",
                  doc="|surprise| top-k, focal loss"))
