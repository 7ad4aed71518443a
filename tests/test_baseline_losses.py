"""The baselines' losses against hand-computed values (opsdl_core.train.baseline_losses)."""

from __future__ import annotations

import math

import pytest
import torch

from opsdl_core.train.baseline_losses import longpo_dpo_loss, response_labels, sequence_logprobs, sft_loss


def test_longpo_dpo_loss_equals_the_hand_computed_value():
    pc = torch.tensor([-1.0, -4.0], requires_grad=True)  # policy, chosen answers, long prompt
    pr = torch.tensor([-3.0, -1.0], requires_grad=True)  # policy, rejected answers, long prompt
    rc = torch.tensor([-2.0, -1.0], requires_grad=True)  # reference, chosen, short prompt
    rr = torch.tensor([-2.0, -1.0])
    out = longpo_dpo_loss(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc,
                          ref_rejected_logps=rr, beta=0.1)
    # pair 1: margin = 0.1((-1+2) - (-3+2)) = 0.2 -> log(1+e^-0.2); pair 2: margin = 0.1(-3 - 0) = -0.3
    expected = (math.log1p(math.exp(-0.2)) + math.log1p(math.exp(0.3))) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.7262470569, abs=1e-6)
    assert out.metrics["reward_accuracy"] == 0.5 and out.metrics["reward_margin"] == pytest.approx(-0.05)
    out.loss.backward()
    sig = 1 / (1 + math.exp(0.2))  # sigma(-margin) of pair 1
    assert pc.grad[0].item() == pytest.approx(-0.1 * sig / 2, abs=1e-7)  # raising the chosen answer lowers the loss
    assert pr.grad[0].item() == pytest.approx(0.1 * sig / 2, abs=1e-7)
    assert rc.grad is None  # the reference is never differentiated


def test_longpo_nll_term_is_the_chosen_answers_per_token_nll():
    args = dict(policy_chosen_logps=torch.tensor([-1.0]), policy_rejected_logps=torch.tensor([-3.0]),
                ref_chosen_logps=torch.tensor([-2.0]), ref_rejected_logps=torch.tensor([-2.0]), beta=0.1)
    out = longpo_dpo_loss(**args, nll_weight=0.5, chosen_lengths=torch.tensor([2]))
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-0.2)) + 0.5 * (1.0 / 2), abs=1e-6)
    assert out.loss.item() == pytest.approx(0.8481388693, abs=1e-6)
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        longpo_dpo_loss(**args, nll_weight=0.5)
    with pytest.raises(ValueError, match="beta=0: expected > 0"):
        longpo_dpo_loss(**{**args, "beta": 0})
    with pytest.raises(ValueError, match=r"ref_rejected_logps has shape \(2,\)"):
        longpo_dpo_loss(**{**args, "ref_rejected_logps": torch.zeros(2)})


def test_sft_counts_only_the_answer_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])  # prompt positions and padding are 0
    target_logprobs = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    out = sft_loss(target_logprobs=target_logprobs, mask=mask)
    ce = torch.nn.functional.cross_entropy(logits.detach().reshape(-1, 11), targets.reshape(-1), reduction="none")
    assert out.loss.item() == pytest.approx(float((ce.reshape(2, 5) * mask).sum() / 5), abs=1e-6)
    assert out.metrics["tokens"] == 5
    out.loss.backward()
    assert logits.grad[0, :2].abs().sum() == 0 and logits.grad[1, 3:].abs().sum() == 0  # prompt/padding: no grad
    assert logits.grad[0, 2:].abs().sum() > 0
    empty = sft_loss(target_logprobs=target_logprobs, mask=torch.zeros(2, 5))
    assert empty.loss.item() == 0.0 and empty.loss.requires_grad


def test_response_labels_mask_the_prompt_and_sequence_logprobs_sum_the_answer():
    assert response_labels(3, [5, 6, 7, 8, 9]) == [-100, -100, -100, 8, 9]
    with pytest.raises(ValueError, match="prompt_len=6"):
        response_labels(6, [1, 2])
    lp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]])
    assert sequence_logprobs(lp, torch.tensor([[1, 1, 0], [1, 0, 0]])).tolist() == [-3.0, -0.5]
