"""The method, as pure tensor functions: score kinds, selection strategies and objectives, each behind a
registry with a declared contract (`registry.py`), the one `Selection` value (`spec.py`), and the one next-token
shift of the project (`loss.py`). No files, no config, no logging: tensors in, tensors out.

Importing the package registers every built-in (its modules register their own entries; the methods that
combine them are registered below), so that any `from selective_lm.method.x import y` sees the full registry.
"""

from . import loss, selection, spec  # noqa: F401  (each registers its entries)
from .loss import (
    Batch,
    SelectiveLoss,
    finite_or_nan,
    selected_sum,
    selection_result,
    token_entropies,
    token_losses,
)
from .registry import (
    METHODS,
    OBJECTIVES,
    SCORE_KINDS,
    STRATEGIES,
    Method,
    Objective,
    ScoreKind,
    Strategy,
    TokenView,
    register_method,
    register_objective,
    register_score,
    register_strategy,
)
from .spec import Selection

# What a plugin needs (docs/add-a-method.md): the registries and their entries, and the loss path's parts.
__all__ = ["METHODS", "OBJECTIVES", "SCORE_KINDS", "STRATEGIES", "Batch", "Method", "Objective", "ScoreKind",
           "Selection", "SelectiveLoss", "Strategy", "TokenView", "finite_or_nan", "register_method",
           "register_objective", "register_score", "register_strategy", "selected_sum", "selection_result",
           "token_entropies", "token_losses"]

# The built-in methods made of strategies and objectives registered by the modules above.
register_method("clm", Method(strategy=None, role="baseline", doc="every token (the baseline)"))
register_method("oracle", Method(strategy=None, role="baseline", oracle=True,
                                 doc="every token but the injected noise (what a perfect filter would train)"))
register_method("topk", Method(strategy="topk", in_default_grid=True, doc="the highest scores (Rho-1)"))
register_method("random", Method(strategy="random", role="control", in_default_grid=True,
                                 question="Does the score choose better than chance at the same count? (the main "
                                 "table sets each selecting run beside random at its ratio)",
                                 doc="uniform draws, as many tokens as the ratio keeps"))
register_method("stochastic", Method(strategy="stochastic", in_default_grid=True,
                                     doc="draws ∝ softmax(score / train.temperature), or ∝ its positive part"))
register_method("bottomk", Method(strategy="bottomk", role="control", compare=("bottomk", "random"),
                                  in_default_grid=True,
                                  question="The score's sign: if the score carries signal, training on the lowest "
                                  "scores must lose to random at the same count",
                                  conclusions={"loses to": "the score carries signal there, in the direction the "
                                               "method assumes",
                                               "beats": "the lowest scores train better than chance: the score "
                                               "points the wrong way there"},
                                  doc="the lowest scores (the sign check)"))

# After the methods above: the distillation objective and its methods, the field's methods
# (docs/methods-side-by-side.md).
from . import distill, online, weighting  # noqa: E402, F401
