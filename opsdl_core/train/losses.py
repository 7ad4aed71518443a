"""Distillation losses for OPSDL (on-policy self-distillation for long-context LMs).

The student sees the long context ``x_L`` and the teacher (the same model, or a
frozen copy) sees a short context ``x_S`` with the evidence; both score the
response ``y`` that the student sampled.  All losses here are pure functions of
tensors: no model calls, no global state.

Notation and conventions shared by every function:

* ``B`` = number of sequences, ``R`` = response positions, ``V`` = vocabulary.
* ``mask`` is ``[B, R]`` (bool or float 0/1); non-zero entries mark real
  response tokens.  Masked positions contribute nothing to the loss, its
  gradient or the metrics (their inputs may hold any finite values).
* Reductions are token-level: sum over masked tokens / number of masked tokens
  in the whole batch.  A batch with no tokens gives a loss of exactly 0 that is
  still attached to the student's graph (so ``loss.backward()`` works).
* The teacher is never differentiated: its tensors are detached here even if
  the caller forgot to.
* Half-precision inputs are upcast to float32 before any log-softmax/exp;
  float64 inputs stay float64.

Two families:

* ``pointwise_reverse_kl_loss`` (the paper's default) needs only the
  log-probabilities of the sampled tokens, ``[B, R]``.  It is a score-function
  (REINFORCE-style) estimator whose *gradient* is, at every response position,
  an unbiased estimate of the gradient of the per-position reverse KL,
  KL(pi_theta(.|x_L, y_<t) || pi_T(.|x_S, y_<t)), at the prefixes the student
  sampled (no credit assigned through later positions, as in the paper).
* ``reverse_kl_loss`` / ``forward_kl_loss`` / ``jsd_loss`` /
  ``topk_reverse_kl_loss`` use the full next-token distributions,
  ``[B, R, V]`` logits, and compute exact per-position divergences.

``compute_loss(kind, ...)`` dispatches on ``kind`` in ``LOSS_KINDS``.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from ..config import LOSS_KINDS  # the choices, declared once

__all__ = [
    "LOSS_KINDS",
    "LossOutput",
    "compute_loss",
    "forward_kl_loss",
    "jsd_loss",
    "masked_mean",
    "needs_full_logits",
    "pointwise_reverse_kl_loss",
    "reverse_kl_loss",
    "topk_reverse_kl_loss",
]


@dataclass
class LossOutput:
    """Result of a distillation loss.

    Attributes:
        loss: scalar tensor, differentiable w.r.t. the student's inputs.
        per_token: ``[B, R]`` detached per-token contribution to the loss
            (0 where ``mask == 0``); ``loss == per_token.sum() / n_tokens``.
        metrics: python floats for logging; always contains ``"tokens"``
            (number of masked-in tokens).
    """

    loss: torch.Tensor
    per_token: torch.Tensor
    metrics: Dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Upcast to at least float32 (keeps float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _bool_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-level mean of ``x`` over the entries where ``mask`` is non-zero.

    Args:
        x: any shape, e.g. ``[B, R]``.
        mask: same shape as ``x`` (bool or float 0/1).

    Returns:
        Scalar ``sum(x[mask]) / count(mask)``.  With no masked-in entries it is
        exactly 0 and still connected to ``x``'s graph.  Values of ``x`` at
        masked-out entries never reach the result (even inf/NaN in the forward).
    """
    if x.shape != mask.shape:
        raise ValueError(f"masked_mean: x has shape {tuple(x.shape)} but mask has shape {tuple(mask.shape)}")
    m = _bool_mask(mask)
    total = torch.where(m, x, torch.zeros_like(x)).sum()
    return total / m.sum().clamp(min=1).to(total.dtype)


def _check_same_shape(mask: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    """Raise ValueError naming the first tensor whose shape differs from ``mask``'s."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, R], got shape {tuple(mask.shape)}")
    for name, t in tensors.items():
        if t is not None and t.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but mask has shape {tuple(mask.shape)}; expected [B, R]")


def _log_probs(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate ``[B, R, V]`` logits against ``mask`` and return (student, teacher) log-probs.

    Teacher logits are detached.  Both are divided by ``temperature`` and
    log-softmaxed in (at least) float32.
    """
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, R, V], got shape {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits has shape {tuple(teacher_logits.shape)} but student_logits has shape "
            f"{tuple(student_logits.shape)}"
        )
    if mask.shape != student_logits.shape[:2]:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but student_logits has shape {tuple(student_logits.shape)}; "
            "expected mask [B, R] for logits [B, R, V]"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = torch.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    t = torch.log_softmax(_upcast(teacher_logits.detach()) / temperature, dim=-1)
    return s, t


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p || q) = sum_v p (log p - log q) over the last dim."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _divergence_output(per_token: torch.Tensor, mask: torch.Tensor, **extra: float) -> LossOutput:
    """Wrap a ``[B, R]`` per-token divergence into a LossOutput (loss = masked mean)."""
    m = _bool_mask(mask)
    loss = masked_mean(per_token, m)
    metrics = {"kl_mean": float(loss.detach()), "tokens": float(m.sum()), **extra}
    per_token = torch.where(m, per_token, torch.zeros_like(per_token)).detach()
    return LossOutput(loss=loss, per_token=per_token, metrics=metrics)


# --------------------------------------------------------------------------- pointwise


def pointwise_reverse_kl_loss(
    *,
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    sampler_logprobs: Optional[torch.Tensor] = None,
    advantage_clip: Optional[float] = None,
    is_ratio_clip: Optional[float] = None,
) -> LossOutput:
    """Sampled (score-function) reverse-KL loss on the student's own tokens: the paper's default.

    With ``s_t = log pi_theta(y_t | x_L, y_<t)`` and ``q_t = log pi_T(y_t | x_S, y_<t)``
    the per-token advantage is ``A_t = stopgrad(q_t - s_t)`` and

        loss = -sum_t mask_t * w_t * A_t * s_t / sum_t mask_t.

    When ``y`` is sampled from the student (``w_t = 1``), the gradient of this
    loss is an unbiased estimate of the gradient of the per-token reverse KL
    ``KL(pi_theta || pi_T)``.  The loss *value* is not a KL; use the
    ``kl_estimate`` metric for that.

    Args:
        student_logprobs: ``[B, R]`` log-probs of the sampled tokens under the
            student (long context), WITH grad.
        teacher_logprobs: ``[B, R]`` log-probs of the same tokens under the
            teacher (short context); detached here.
        mask: ``[B, R]`` bool or float 0/1, real response tokens.
        sampler_logprobs: optional ``[B, R]`` log-probs under the policy that
            actually generated ``y`` (e.g. an inference engine or a stale copy).
            When given, tokens are reweighted by the importance ratio
            ``w_t = stopgrad(exp(s_t - sampler_t))``; when ``None``, ``w_t = 1``.
        advantage_clip: if set (> 0), ``A_t`` is clamped to ``[-c, c]``.
        is_ratio_clip: if set (> 0) together with ``sampler_logprobs``, the
            importance weight is truncated: ``w_t = min(w_t, is_ratio_clip)``.
            With ``sampler_logprobs`` and no ``is_ratio_clip`` the weight is
            used untruncated.  Ignored when ``sampler_logprobs`` is None.

    Returns:
        LossOutput with metrics ``advantage_mean`` and ``advantage_abs_mean``
        (of the clipped advantage), ``kl_estimate`` (masked mean of
        ``s_t - q_t``, the sampled reverse-KL estimate), ``clip_frac``
        (fraction of tokens whose advantage was clipped), ``is_ratio_mean``
        (raw ratio, 1.0 without sampler), ``is_weight_mean`` (weight actually
        applied), ``is_trunc_frac`` (fraction truncated) and ``tokens``.

    Raises:
        ValueError: on shape mismatch or non-positive clip values.
    """
    _check_same_shape(
        mask, student_logprobs=student_logprobs, teacher_logprobs=teacher_logprobs, sampler_logprobs=sampler_logprobs
    )
    if advantage_clip is not None and not advantage_clip > 0:
        raise ValueError(f"advantage_clip must be > 0 or None, got {advantage_clip}")
    if is_ratio_clip is not None and not is_ratio_clip > 0:
        raise ValueError(f"is_ratio_clip must be > 0 or None, got {is_ratio_clip}")

    m = _bool_mask(mask)
    s = _upcast(student_logprobs)
    q = _upcast(teacher_logprobs.detach()).to(s.dtype)
    s_ng = s.detach()

    raw_adv = q - s_ng
    adv = raw_adv
    clip_frac = 0.0
    if advantage_clip is not None:
        adv = raw_adv.clamp(-advantage_clip, advantage_clip)
        clip_frac = float(masked_mean((raw_adv.abs() > advantage_clip).to(s.dtype), m))

    if sampler_logprobs is not None:
        ratio = torch.exp(s_ng - _upcast(sampler_logprobs.detach()).to(s.dtype))
        w = ratio if is_ratio_clip is None else ratio.clamp(max=is_ratio_clip)
        is_ratio_mean = float(masked_mean(ratio, m))
        is_weight_mean = float(masked_mean(w, m))
        is_trunc_frac = 0.0 if is_ratio_clip is None else float(masked_mean((ratio > is_ratio_clip).to(s.dtype), m))
    else:
        w = torch.ones_like(s_ng)
        is_ratio_mean = is_weight_mean = 1.0
        is_trunc_frac = 0.0

    per_token = -(w * adv) * s
    loss = masked_mean(per_token, m)
    metrics = {
        "advantage_mean": float(masked_mean(adv, m)),
        "advantage_abs_mean": float(masked_mean(adv.abs(), m)),
        "kl_estimate": float(masked_mean(-raw_adv, m)),
        "clip_frac": clip_frac,
        "is_ratio_mean": is_ratio_mean,
        "is_weight_mean": is_weight_mean,
        "is_trunc_frac": is_trunc_frac,
        "tokens": float(m.sum()),
    }
    per_token = torch.where(m, per_token, torch.zeros_like(per_token)).detach()
    return LossOutput(loss=loss, per_token=per_token, metrics=metrics)


# --------------------------------------------------------------------------- full distribution


def reverse_kl_loss(
    *, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> LossOutput:
    """Exact per-position reverse KL, ``sum_v p_S (log p_S - log p_T)`` (mode-seeking).

    Args:
        student_logits: ``[B, R, V]`` student logits (long context), with grad.
        teacher_logits: ``[B, R, V]`` teacher logits (short context); detached.
        mask: ``[B, R]`` real response tokens.
        temperature: logits are divided by it before the softmax.

    Returns:
        LossOutput; loss = masked mean of the per-token KL; metrics ``kl_mean``, ``tokens``.
    """
    s, t = _log_probs(student_logits, teacher_logits, mask, temperature)
    return _divergence_output(_kl(s, t), mask)


def forward_kl_loss(
    *, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> LossOutput:
    """Exact per-position forward KL, ``sum_v p_T (log p_T - log p_S)`` (mass-covering).

    Shapes and arguments as in :func:`reverse_kl_loss`.
    """
    s, t = _log_probs(student_logits, teacher_logits, mask, temperature)
    return _divergence_output(_kl(t, s), mask)


def jsd_loss(
    *,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> LossOutput:
    """Generalized Jensen-Shannon divergence (same convention as TRL's ``generalized_jsd_loss``).

    With ``M = beta * p_T + (1 - beta) * p_S`` (``log M`` via logsumexp of the
    log-probs plus log-weights), per token::

        beta * KL(p_T || M) + (1 - beta) * KL(p_S || M)

    ``beta = 0.5`` is the symmetric JSD.  Shapes as in :func:`reverse_kl_loss`.

    Raises:
        ValueError: unless ``0 < beta < 1`` (the generalized JSD vanishes at the
            ends; use ``forward_kl_loss`` / ``reverse_kl_loss`` for those).
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(
            f"jsd beta must satisfy 0 < beta < 1, got {beta}; for the end points use forward_kl "
            "(forward_kl_loss) or reverse_kl (reverse_kl_loss) instead"
        )
    s, t = _log_probs(student_logits, teacher_logits, mask, temperature)
    log_m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log1p(-beta)]), dim=0)
    per_token = beta * _kl(t, log_m) + (1.0 - beta) * _kl(s, log_m)
    return _divergence_output(per_token, mask)


def topk_reverse_kl_loss(
    *,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    k: int = 20,
    temperature: float = 1.0,
) -> LossOutput:
    """Reverse KL restricted to the student's top-k tokens (a truncated approximation).

    At each position ``K`` = indices of the student's ``k`` largest logits
    (chosen without grad).  Both distributions are renormalised over ``K``
    (log-softmax of the gathered, temperature-scaled logits) and the loss is
    ``sum_{v in K} p~_S (log p~_S - log p~_T)``.  This is *not* the full reverse
    KL: mass outside ``K`` is ignored, and the gradient only reaches the
    student's top-k logits.  ``k >= V`` gives exactly :func:`reverse_kl_loss`.

    Args: as :func:`reverse_kl_loss`, plus ``k`` (int >= 1).

    Returns:
        LossOutput with metrics ``kl_mean``, ``tokens`` and (for ``k < V``)
        ``topk_mass_student`` / ``topk_mass_teacher``: masked mean of the full
        probability mass each model puts on ``K`` (how much the truncation drops).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"topk k must be an int >= 1, got {k!r}")
    if student_logits.dim() == 3 and k >= student_logits.shape[-1]:
        return reverse_kl_loss(
            student_logits=student_logits, teacher_logits=teacher_logits, mask=mask, temperature=temperature
        )
    # Validation (and full log-probs for the mass diagnostics) via the shared helper.
    s_full, t_full = _log_probs(student_logits.detach(), teacher_logits, mask, temperature)
    idx = student_logits.detach().topk(k, dim=-1).indices
    s = torch.log_softmax(_upcast(student_logits).gather(-1, idx) / temperature, dim=-1)
    t = torch.log_softmax(_upcast(teacher_logits.detach()).gather(-1, idx) / temperature, dim=-1)
    m = _bool_mask(mask)
    extra = {
        "topk_mass_student": float(masked_mean(s_full.gather(-1, idx).exp().sum(-1), m)),
        "topk_mass_teacher": float(masked_mean(t_full.gather(-1, idx).exp().sum(-1), m)),
    }
    return _divergence_output(_kl(s, t), mask, **extra)


# --------------------------------------------------------------------------- dispatch


def needs_full_logits(kind: str) -> bool:
    """Whether ``kind`` needs ``[B, R, V]`` logits (True) or only sampled-token log-probs (False)."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; valid kinds: {', '.join(LOSS_KINDS)}")
    return kind != "pointwise"


def compute_loss(
    kind: str,
    *,
    mask: torch.Tensor,
    student_logprobs: Optional[torch.Tensor] = None,
    teacher_logprobs: Optional[torch.Tensor] = None,
    student_logits: Optional[torch.Tensor] = None,
    teacher_logits: Optional[torch.Tensor] = None,
    sampler_logprobs: Optional[torch.Tensor] = None,
    advantage_clip: Optional[float] = None,
    is_ratio_clip: Optional[float] = None,
    jsd_beta: float = 0.5,
    topk: int = 20,
    temperature: float = 1.0,
) -> LossOutput:
    """Compute the distillation loss named by ``kind`` (one of ``LOSS_KINDS``).

    ``"pointwise"`` uses ``student_logprobs`` / ``teacher_logprobs`` ``[B, R]``
    (and ``sampler_logprobs``, ``advantage_clip``, ``is_ratio_clip``);
    the other kinds use ``student_logits`` / ``teacher_logits`` ``[B, R, V]``
    (and ``temperature``, ``jsd_beta`` for ``"jsd"``, ``topk`` for
    ``"topk_reverse_kl"``).  Arguments that a kind does not use are ignored.

    Raises:
        ValueError: unknown ``kind`` (message lists the valid kinds) or a
            tensor the kind needs is missing (message names it).
    """
    full = needs_full_logits(kind)
    required = ("student_logits", "teacher_logits") if full else ("student_logprobs", "teacher_logprobs")
    given = {
        "student_logprobs": student_logprobs,
        "teacher_logprobs": teacher_logprobs,
        "student_logits": student_logits,
        "teacher_logits": teacher_logits,
    }
    missing = [name for name in required if given[name] is None]
    if missing:
        raise ValueError(f"loss kind {kind!r} requires {' and '.join(missing)} (got None)")

    if kind == "pointwise":
        return pointwise_reverse_kl_loss(student_logprobs=student_logprobs, teacher_logprobs=teacher_logprobs,
                                         mask=mask, sampler_logprobs=sampler_logprobs, advantage_clip=advantage_clip,
                                         is_ratio_clip=is_ratio_clip)
    logits = dict(student_logits=student_logits, teacher_logits=teacher_logits, mask=mask, temperature=temperature)
    if kind == "reverse_kl":
        return reverse_kl_loss(**logits)
    if kind == "forward_kl":
        return forward_kl_loss(**logits)
    if kind == "jsd":
        return jsd_loss(**logits, beta=jsd_beta)
    return topk_reverse_kl_loss(**logits, k=topk)
