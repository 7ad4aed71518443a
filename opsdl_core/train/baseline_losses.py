"""Losses of the two baselines OPSDL is compared with: Long-SFT and DPO in the LongPO form.

Pure functions of tensors, as in ``opsdl_core.train.losses`` (``B`` sequences or pairs, ``R`` response
positions; ``mask [B, R]`` marks real response tokens; prompt positions never enter a loss).

* **Long-SFT** (``sft_loss``): cross-entropy of the target answer given the *long* prompt,
  averaged over the answer's tokens in the batch. The target is the model's own answer from
  ``C_s`` (the label-free setting) or a reference answer.
* **DPO, LongPO form** (``longpo_dpo_loss``): for each prompt a pair of the model's own answers,
  chosen ``y_w`` = its answer from the short context, rejected ``y_l`` = its answer from the long
  context. The policy scores both given the long prompt ``x_L``; the reference policy (the frozen
  initial model) scores them given the *short* prompt ``x_S`` (LongPO's short-to-long
  reference), so the implicit reward of an answer is how much more likely the long-context policy
  makes it than the short-context reference:

      r(y) = β · (log π_θ(y | x_L) − log π_ref(y | x_S))            (sums over y's tokens)
      loss = −log σ(r(y_w) − r(y_l)) + λ · NLL_θ(y_w | x_L)        (NLL: mean per token of y_w)

  TRL's ``DPOTrainer`` computes the reference log-probs from the same batch as the policy's
  (``concatenated_forward`` on prompt + completion, or precomputed from it), so it cannot express a
  reference that reads a different prompt; hence this function, tested against hand-computed values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["BaselineLossOutput", "sequence_logprobs", "sft_loss", "longpo_dpo_loss", "response_labels"]

IGNORE_INDEX = -100


@dataclass
class BaselineLossOutput:
    loss: torch.Tensor  # scalar, differentiable w.r.t. the policy's inputs
    metrics: dict[str, float] = field(default_factory=dict)


def _check(mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.shape[:2] != mask.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [B, R] = {tuple(mask.shape)} "
                             f"(leading dims) like mask")


def sequence_logprobs(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]``: the sum of ``token_logprobs [B, R]`` over masked-in positions."""
    _check(mask, token_logprobs=token_logprobs)
    return (token_logprobs.float() * mask.float()).sum(-1)


def response_labels(prompt_len: int, input_ids: list[int]) -> list[int]:
    """Causal-LM labels for ``prompt + response`` ids: the prompt's positions are ``-100`` (ignored
    by cross-entropy), the response's are its ids."""
    if not 0 <= prompt_len <= len(input_ids):
        raise ValueError(f"prompt_len={prompt_len}: expected 0 <= prompt_len <= len(input_ids)={len(input_ids)}")
    return [IGNORE_INDEX] * prompt_len + list(input_ids[prompt_len:])


def sft_loss(*, target_logprobs: torch.Tensor, mask: torch.Tensor) -> BaselineLossOutput:
    """Token-mean cross-entropy of the target answers: ``target_logprobs [B, R]`` are
    ``log π_θ(y_t | x_L, y_<t)`` of each target token (``scoring.score_responses`` computes them with
    the LM head at the answer's positions only), averaged over ``mask``'s positions. A batch
    without tokens gives 0, still attached to the graph."""
    _check(mask, target_logprobs=target_logprobs)
    m = mask.bool()
    n = int(m.sum())
    loss = -(target_logprobs.float() * m).sum() / max(n, 1)
    return BaselineLossOutput(loss, {"tokens": float(n), "nll": float(loss.detach())})


def longpo_dpo_loss(*, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
                    nll_weight: float = 0.0, chosen_lengths: torch.Tensor | None = None) -> BaselineLossOutput:
    """DPO on ``B`` pairs, LongPO form (module docstring). All inputs are ``[B]`` sequence log-probs
    (sums over each answer's tokens): the policy's given the long prompt, the reference's given the
    short prompt (detached here). ``nll_weight`` λ adds the chosen answers' per-token NLL under the
    policy, which needs ``chosen_lengths [B]`` (their token counts)."""
    if beta <= 0:
        raise ValueError(f"beta={beta}: expected > 0")
    if nll_weight < 0:
        raise ValueError(f"nll_weight={nll_weight}: expected >= 0")
    shape = policy_chosen_logps.shape
    for name, t in (("policy_rejected_logps", policy_rejected_logps), ("ref_chosen_logps", ref_chosen_logps),
                    ("ref_rejected_logps", ref_rejected_logps)):
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)} like policy_chosen_logps")
    chosen_reward = beta * (policy_chosen_logps.float() - ref_chosen_logps.detach().float())
    rejected_reward = beta * (policy_rejected_logps.float() - ref_rejected_logps.detach().float())
    margin = chosen_reward - rejected_reward
    pref = -F.logsigmoid(margin)
    loss = pref.mean()
    metrics = {"dpo": float(pref.mean().detach()), "reward_margin": float(margin.mean().detach()),
               "reward_accuracy": float((margin > 0).float().mean()),
               "chosen_reward": float(chosen_reward.mean().detach()),
               "rejected_reward": float(rejected_reward.mean().detach())}
    if nll_weight > 0:
        if chosen_lengths is None or chosen_lengths.shape != shape:
            raise ValueError("nll_weight > 0 needs chosen_lengths [B] (token counts of the chosen answers)")
        nll = (-policy_chosen_logps.float() / chosen_lengths.float().clamp(min=1)).mean()
        loss = loss + nll_weight * nll
        metrics["nll"] = float(nll.detach())
    return BaselineLossOutput(loss, metrics)
