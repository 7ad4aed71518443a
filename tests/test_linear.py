"""The oneDNN linear layer gives what ``F.linear`` gives (outputs and gradients, any row count, with and without
bias, frozen or trainable weights, strided inputs), never computes from a stale packed weight, leaves other dtypes,
autocast and builds without oneDNN to ``F.linear``, every model the project loads uses it, and LoRA wrapping,
merging and saving see a plain ``nn.Linear``."""

from __future__ import annotations

import copy
import platform

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from opsdl_core.models import linear
from opsdl_core.models.linear import CpuLinear, drop_packed, onednn_available, use_cpu_linear
from opsdl_core.models.rollout import SamplingParams, TransformersRollout
from opsdl_core.models.scoring import score_responses
from opsdl_core.models.tiny import build_tiny_model

TOL = dict(atol=2e-5, rtol=2e-5)  # float32 rounding of a 24-term dot product, another summation order


def test_onednn_is_there_on_x86():
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert onednn_available(), "PyTorch's x86 CPU build ships oneDNN; the fast path would silently be off"


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("shape", [(1, 24), (2, 24), (4, 24), (3, 4, 24), (1, 32, 24), (33, 24), (2, 50, 24)])
def test_outputs_and_gradients_match_f_linear(shape, bias, frozen):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40, bias=bias)
    ours = copy.deepcopy(layer)
    use_cpu_linear(ours)
    assert type(ours) is CpuLinear
    for m in (layer, ours):
        m.weight.requires_grad_(not frozen)
    x1 = torch.randn(*shape, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = layer(x1), ours(x2)
    assert y2.shape == y1.shape and y2.is_contiguous()
    torch.testing.assert_close(y2, y1, **TOL)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, **TOL)
    if frozen:
        assert ours.weight.grad is None
    else:
        torch.testing.assert_close(ours.weight.grad, layer.weight.grad, **TOL)
    if bias:
        torch.testing.assert_close(ours.bias.grad, layer.bias.grad, **TOL)
    y2.view(-1)  # a view of the result works, as transformers' reshapes need
    with torch.no_grad():  # without gradient: the packed weight up to 32 rows, the plain one beyond
        torch.testing.assert_close(ours(x2), F.linear(x2, layer.weight, layer.bias), **TOL)


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch has no oneDNN")
def test_the_packed_weight_follows_every_change_of_the_weight():
    torch.manual_seed(3)
    layer = CpuLinear(24, 40, bias=False).requires_grad_(False)
    x = torch.randn(4, 24)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), **TOL)
        assert layer in linear._PACKED  # a few rows without gradient: the packed copy was used
        first = linear._PACKED[layer][3]
        layer(x)
        assert linear._PACKED[layer][3] is first  # unchanged weight: not packed again
        layer.weight.mul_(-2.0)  # in place (an optimizer step, a sampler sync)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), **TOL)
        torch.addmm(layer.weight, torch.randn(40, 2), torch.randn(2, 24), out=layer.weight)  # merge_lora_into's write
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), **TOL)
        layer.load_state_dict({"weight": torch.randn(40, 24)})
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), **TOL)
        layer.weight = nn.Parameter(torch.randn(40, 24), requires_grad=False)  # another tensor
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), **TOL)
    assert drop_packed(layer) == 1 and layer not in linear._PACKED
    copied = copy.deepcopy(layer)  # a copy (the merged sampler is one) packs its own weight
    with torch.no_grad():
        copied.weight.zero_()
        assert torch.equal(copied(x), torch.zeros(4, 40))
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), **TOL)


def test_strided_inputs_other_dtypes_autocast_and_no_onednn(monkeypatch):
    torch.manual_seed(1)
    layer = CpuLinear(16, 8, bias=False)
    x = torch.randn(16, 4).t()  # [4, 16], not contiguous
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight), **TOL)
    half = CpuLinear(16, 8, bias=False).to(torch.bfloat16)  # not float32: F.linear, exactly
    xb = torch.randn(4, 16, dtype=torch.bfloat16)
    assert torch.equal(half(xb), F.linear(xb, half.weight))
    empty = torch.randn(0, 16)
    assert layer(empty).shape == (0, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtype: F.linear, as for nn.Linear
        got, want = layer(x), F.linear(x, layer.weight)
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
    monkeypatch.setattr(linear, "onednn_available", lambda: False)
    assert torch.equal(layer(x), F.linear(x, layer.weight))


def test_the_lora_forward_backward_runs_through_it():
    from opsdl_core.config import RunConfig
    from opsdl_core.train.lora import apply_lora

    model, _ = build_tiny_model(seed=4)
    stock = copy.deepcopy(model)
    for m in stock.modules():
        if type(m) is CpuLinear:
            m.__class__ = nn.Linear
    cfg = RunConfig.from_dict({"lora": {"enabled": True, "r": 4, "alpha": 8}})
    peft_models = [apply_lora(m, cfg) for m in (model, stock)]
    with torch.no_grad():
        for n, prm in peft_models[0].named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(prm, std=0.1)  # B starts at zero: make the adapter count
        peft_models[1].load_state_dict(peft_models[0].state_dict())  # the same adapter in both
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    losses = []
    for p in peft_models:
        p.train()
        loss = p(input_ids=ids).logits.float().logsumexp(-1).mean()
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], **TOL)
    grads = [{n: prm.grad for n, prm in p.named_parameters() if prm.requires_grad} for p in peft_models]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-4, rtol=1e-4, msg=n)


def test_loaded_models_use_it_and_lora_sees_a_linear():
    from peft import LoraConfig, get_peft_model

    model, _ = build_tiny_model(seed=2)
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.Linear)}
    assert kinds == {CpuLinear}, kinds
    keys = set(model.state_dict())
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    wrapped = [n for n, m in peft.named_modules() if n.endswith("q_proj") and hasattr(m, "base_layer")]
    assert wrapped, "LoRA wraps the oneDNN layers like any nn.Linear"
    merged = peft.merge_and_unload()
    assert set(merged.state_dict()) == keys


def test_a_model_decodes_and_scores_the_same_with_either_form():
    fast, tok = build_tiny_model(seed=5, num_heads=4, num_kv_heads=2)
    stock = copy.deepcopy(fast)
    for m in stock.modules():
        if type(m) is CpuLinear:
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
