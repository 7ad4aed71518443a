"""The few-rows linear form gives what ``F.linear`` gives (outputs and gradients, any row count, with and
without bias, strided inputs), every model the project loads uses it, and LoRA wrapping, merging and saving
see a plain ``nn.Linear``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from opsdl_core.models.linear import FewRowsLinear, use_few_rows_linear
from opsdl_core.models.rollout import SamplingParams, TransformersRollout
from opsdl_core.models.scoring import score_responses
from opsdl_core.models.tiny import build_tiny_model


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 24), (2, 24), (4, 24), (3, 4, 24), (1, 32, 24), (33, 24), (2, 50, 24)])
def test_outputs_and_gradients_match_f_linear(shape, bias):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40, bias=bias)
    few = copy.deepcopy(layer)
    use_few_rows_linear(few)
    assert type(few) is FewRowsLinear
    x1 = torch.randn(*shape, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = layer(x1), few(x2)
    assert y2.shape == y1.shape and y2.is_contiguous()
    torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(few.weight.grad, layer.weight.grad, atol=1e-5, rtol=1e-5)
    if bias:
        torch.testing.assert_close(few.bias.grad, layer.bias.grad, atol=1e-5, rtol=1e-5)
    y2.view(-1)  # a view of the result works, as transformers' reshapes need


def test_strided_inputs_and_other_dtypes():
    torch.manual_seed(1)
    layer = FewRowsLinear(16, 8, bias=False)
    x = torch.randn(16, 4).t()  # [4, 16], not contiguous
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight), atol=1e-6, rtol=1e-5)
    half = FewRowsLinear(16, 8, bias=False).to(torch.bfloat16)  # not float32: F.linear, exactly
    xb = torch.randn(4, 16, dtype=torch.bfloat16)
    assert torch.equal(half(xb), F.linear(xb, half.weight))
    empty = torch.randn(0, 16)
    assert layer(empty).shape == (0, 8)


def test_loaded_models_use_it_and_lora_sees_a_linear():
    from peft import LoraConfig, get_peft_model

    model, _ = build_tiny_model(seed=2)
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.Linear)}
    assert kinds == {FewRowsLinear}, kinds
    keys = set(model.state_dict())
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    wrapped = [n for n, m in peft.named_modules() if n.endswith("q_proj") and hasattr(m, "base_layer")]
    assert wrapped, "LoRA wraps the few-rows layers like any nn.Linear"
    merged = peft.merge_and_unload()
    assert set(merged.state_dict()) == keys


def test_a_model_decodes_and_scores_the_same_with_either_form():
    fast, tok = build_tiny_model(seed=5, num_heads=4, num_kv_heads=2)
    stock = copy.deepcopy(fast)
    for m in stock.modules():
        if type(m) is FewRowsLinear:
            m.__class__ = nn.Linear
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    params = SamplingParams(temperature=0, max_new_tokens=6)
    outs = [TransformersRollout(m, pad_id=0).generate(prompts, n=3, params=params, seed=0) for m in (fast, stock)]
    assert outs[0].response_ids == outs[1].response_ids
    torch.testing.assert_close(torch.tensor(outs[0].sampler_logprobs), torch.tensor(outs[1].sampler_logprobs),
                               atol=1e-5, rtol=1e-5)
    scored = [score_responses(m, prompts=prompts, responses=outs[0].response_ids, prompt_index=outs[0].prompt_index,
                              pad_id=0).logprobs for m in (fast, stock)]
    torch.testing.assert_close(scored[0], scored[1], atol=1e-5, rtol=1e-5)
