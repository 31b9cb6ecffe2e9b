"""Comparisons of two runs that compute the same thing in another order, with bounds that follow from the algorithm.

Two runs that differ only in how their sums are ordered (micro-batch split, compiled kernels, processes, another
CPU's kernels or thread count) agree up to float noise in every loss and gradient, but not elementwise in their
weights: AdamW normalises each weight's update by its own gradient scale, so a weight whose gradient is no bigger
than the float noise moves by up to ~lr per step, in a direction the noise decides. Nor do their selections agree
exactly where two tokens' scores are tied within the noise. What stays true, and is checked here:

- `assert_same_updates`: the updates (trained − start) agree in norm (`UPDATE_REL`, from the gradients' float noise
  `GRAD_ETA`), and no weight differs by more than AdamW can move it (`adam_reach`); the worst element is reported.
- `assert_selection_within_noise`: a selection is the selection of some scores within the scores' noise.
- `assert_close`: one logged figure against another within a bound (recorded with the others).
- `LOSS_ATOL`, `SCORE_ATOL`, `GRAD_ETA`: what two float32 orders of one loss, score or gradient may differ by.

With `SLM_TEST_NUMERICS_LOG=<file>` every comparison appends what it measured and its bound (a JSON line), to see
how far inside the bounds a machine stays (docs/tests.md has the figures of the machines measured).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence

import torch

# torch.optim.AdamW's defaults, which the trainer uses (weight_decay 0 in every test: no decay term to bound).
BETAS = (0.9, 0.999)
U = 2.0**-24  # float32's unit roundoff

# How far a float32 per-token cross-entropy of the smoke model may be from the exact value, in any summation order
# (Higham's first-order bound: a sum of n terms errs by at most n u times the sum of their magnitudes): the
# log-sum-exp sums 257 positive terms, 256 u = 1.5e-5 nats; a logit is a 64-term dot (sum of |h_k W_jk| below
# 1 here) of hidden states that carry the two layers' relative error (attention 16 + 64 + 64 terms, MLP 64 + 128,
# twice, and the final norm: about 700 u = 4e-5); the logits enter the loss twice (log-sum-exp, target): 2 x 4e-5
# + 1.5e-5 = 1e-4. A mean of such losses errs by no more. tests/test_numerics.py measures it on every machine.
LOSS_ATOL = 1e-4
# A score is a difference of two losses (own − reference): within 2 LOSS_ATOL of the exact score.
SCORE_ATOL = 2 * LOSS_ATOL

# A float32 gradient entry's error in any order, relative to the root mean square of its tensor's gradient. An
# entry sums n <= 1024 token terms t_i (4 selection units of 4 x 63 targets), each the product of a backward
# through ~1400 rounded operations (the forward's ~700 and as many back): rounding errors of random sign add up
# as a random walk, sqrt(1400) u |t| per term and u |S_k| per partial sum S_k of the n-term sum, about
# u |t| sqrt(1400 n + n^2 / 2) = 1400 u |t|, while terms of random sign sum to sqrt(n) |t| = 32 |t|: 44 u = 2.6e-6
# for a typical entry. The largest of ~1e5 entries (5 standard deviations out) and terms that cancel more than
# random signs raise it: GRAD_ETA = 3e-5 (tests/test_numerics.py measures it on every machine).
GRAD_ETA = 3e-5
# Two gradients within GRAD_ETA · rms of the exact one, entry by entry, have norms within 2 GRAD_ETA of each other.
GRAD_NORM_REL = 2 * GRAD_ETA

# The updates' relative difference ‖Δa − Δb‖ / ‖Δ‖. Adam's update of a weight is lr times a function of its
# gradient's sign and scale: noise of size eta G (G its tensor's gradient rms) changes the update of a weight whose
# gradient g is within the noise by up to 2 lr (a flipped sign: the first step is lr sign(g)), of the others by
# about lr eta G / |g|. Over a gradient density flat near zero (a normal's of scale G: density 1 / (G sqrt(2 pi))),
# E[min(4, (eta G / g)^2)] = 8 eta / sqrt(2 pi), so the updates differ in norm by sqrt(8 / sqrt(2 pi)) sqrt(eta)
# = 1.79 sqrt(eta) of the update's norm (each update is ~lr per weight): far above eta, the heavy tail of the
# near-zero gradients. At eta = GRAD_ETA, with a round-up for densities more peaked at zero:
UPDATE_REL = 2 * math.sqrt(GRAD_ETA)  # 1.1e-2; distillation against CLM, a real difference, is 0.2 (test_train.py)


def adam_step_reach(t: int, betas: tuple[float, float] = BETAS) -> float:
    """The most AdamW's step t (1-based) can move one weight, in units of that step's lr, over every gradient history.

    The step is lr m̂/(√v̂ + eps) with m = (1−b1) Σ b1^(t−i) g_i, v = (1−b2) Σ b2^(t−i) g_i². Cauchy–Schwarz on
    m, with weights b1^(t−i) = (b1²/b2)^((t−i)/2) · b2^((t−i)/2), bounds |m| by (1−b1) √(S_t v / (1−b2)), S_t =
    Σ_(k<t) (b1²/b2)^k; the bias corrections turn that into the bound returned (eps only makes a step shorter).
    1 at t = 1 (the first step is lr · sign(g)), 1.004 at t = 3, 1.03 at t = 8, 7.3 in the limit.
    """
    b1, b2 = betas
    s = sum((b1 * b1 / b2) ** k for k in range(t))
    return (1 - b1) / (1 - b1**t) * math.sqrt((1 - b2**t) * s / (1 - b2))


def adam_reach(lrs: Sequence[float], betas: tuple[float, float] = BETAS) -> float:
    """Σ_t c_t lr_t: how far AdamW with these per-step learning rates can move one weight, whatever its gradients."""
    return sum(lr * adam_step_reach(t, betas) for t, lr in enumerate(lrs, start=1))


def float_settings() -> dict[str, object]:
    """What decides this process's float order: torch's kernels (CPU capability), threads, oneDNN."""
    return {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "onednn": torch.backends.mkldnn.enabled}


def record(kind: str, **values: object) -> None:
    """Append what a comparison measured to `$SLM_TEST_NUMERICS_LOG` (a JSON line), with the float settings."""
    path = os.environ.get("SLM_TEST_NUMERICS_LOG")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").removesuffix(" (call)")
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "kind": kind, **float_settings(), **values}) + "\n")


def assert_close(a: float | None, b: float | None, *, rel: float = 0.0, abs: float = 0.0, what: str = "") -> None:
    """`a` and `b` within max(rel · max(|a|, |b|), abs), or both None (a figure a step does not log)."""
    assert (a is None) == (b is None), (what, a, b)
    if a is None or b is None:
        return
    bound = max(rel * max(math.fabs(a), math.fabs(b)), abs)
    diff = math.fabs(a - b)
    record("figure", what=what.split(" ")[0], ratio=diff / bound if bound else math.inf)
    assert diff <= bound, f"{what}: {a!r} vs {b!r} differ by {diff:.3g} (bound {bound:.3g})"


def assert_same_updates(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                        start: Mapping[str, torch.Tensor], lrs: Sequence[float], rel: float = UPDATE_REL) -> None:
    """Two runs' trained weights from one start, by AdamW steps at learning rates `lrs`, are the same training.

    Their updates (trained − start) agree in norm, over all the weights: ‖Δa − Δb‖ ≤ rel · max(‖Δa‖, ‖Δb‖)
    (`UPDATE_REL`: where the noise of reordered sums leaves them). No weight differs by more than two runs of AdamW
    can part it, 2 · `adam_reach(lrs)` (plus the rounding of the stored weights): a weight beyond that did not get
    there by these optimizer steps.
    """
    assert set(a) == set(b) and set(a) <= set(start), (sorted(set(a) ^ set(b)), sorted(set(a) - set(start)))
    reach = 2 * adam_reach(lrs)
    diff2 = upd2_a = upd2_b = 0.0
    worst = (-1.0, "", 0)
    for name in sorted(a):
        s, wa, wb = start[name].double(), a[name].double(), b[name].double()
        ua, ub = wa - s, wb - s
        d = (ua - ub).abs()
        diff2 += float(d.square().sum())
        upd2_a += float(ua.square().sum())
        upd2_b += float(ub.square().sum())
        # beyond AdamW's reach, less the rounding of two stored float32 weights (u |w| each)
        excess = d - U * (wa.abs() + wb.abs())
        if d.numel() and float(excess.max()) > worst[0]:
            worst = (float(excess.max()), name, int(excess.argmax()))
    norm = math.sqrt(max(upd2_a, upd2_b))
    measured = math.sqrt(diff2) / norm if norm else 0.0
    record("updates", ratio=measured / rel, rel=measured, elem_ratio=worst[0] / reach, steps=len(lrs))
    _, name, flat = worst
    index = [int(i) for i in torch.unravel_index(torch.tensor(flat), a[name].shape)] if name else []
    where = (f"worst weight {name}{index}: {float(a[name].flatten()[flat]):.8g} vs "
             f"{float(b[name].flatten()[flat]):.8g} from {float(start[name].flatten()[flat]):.8g}, "
             f"|Δa − Δb| less rounding = {worst[0]:.3g} (AdamW's reach over {len(lrs)} steps: {reach:.3g})"
             ) if name else ""
    assert norm > 0, "neither run moved a weight: the comparison would say nothing"
    assert measured <= rel and worst[0] <= reach, (
        f"updates differ: ‖Δa − Δb‖/‖Δ‖ = {measured:.3g} (bound {rel:.3g}); {where}")


def assert_selection_within_noise(selected: torch.Tensor, scores: torch.Tensor, noise: float,
                                  select_fn: Callable[[torch.Tensor], torch.Tensor], what: str = "") -> None:
    """`selected` is `select_fn`'s selection of some scores within `noise` of `scores`, elementwise.

    Pushing every selected token's score up by `noise` and every other one's down by it is such a perturbation;
    and if some perturbation selects `selected`, this one does too, for every strategy whose keys grow with the
    score and whose random draws do not depend on it (topk, stochastic, random; the count depends only on the
    valid tokens): each selected key only rises, each other one only falls. So the check is exact: it fails iff a
    token was selected against a score margin wider than the noise. Two runs whose scores are each within `noise`
    of `scores` therefore select the same tokens except ties within 2 · `noise` of the boundary.
    """
    chosen = selected.bool()
    pushed = scores + noise * (2 * chosen.to(scores.dtype) - 1)
    again = select_fn(pushed).bool()
    record("selection", noise=noise, same_as_scores=torch.equal(select_fn(scores).bool(), chosen))
    if not torch.equal(again, chosen):
        wrong = (again != chosen).nonzero().tolist()[:8]
        detail = ", ".join(f"{tuple(i)}: score {float(scores[tuple(i)]):.6g} {'in' if chosen[tuple(i)] else 'out'}"
                           for i in wrong)
        raise AssertionError(f"{what} selection differs from the scores' beyond their noise {noise:g}: {detail}")
