"""The GQA-aware SDPA attention gives what transformers' own SDPA gives: log-probs, gradients and
greedy rollouts, with left padding (a mask at every call), on a grouped-query tiny model."""

from __future__ import annotations

import copy

import pytest
import torch

from opsdl_core.models.attention import NAME, use_gqa_attention
from opsdl_core.models.rollout import SamplingParams, TransformersRollout
from opsdl_core.models.scoring import score_responses
from opsdl_core.models.tiny import build_tiny_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15, 16], [17, 18, 19, 20, 21]]
RESPONSES = [[30, 31, 32, 33], [34, 35], [36, 37, 38], [39]]
INDEX = [0, 0, 1, 2]


@pytest.fixture(scope="module")
def pair():
    fast, tok = build_tiny_model(seed=3, num_heads=4, num_kv_heads=2)
    assert fast.config._attn_implementation == NAME, "tiny models load with the GQA function, as real ones do"
    stock = copy.deepcopy(fast)
    stock.set_attn_implementation("sdpa")
    return fast, stock


def test_logprobs_and_gradients_match_transformers_sdpa(pair):
    fast, stock = pair
    out = {}
    for name, model in (("fast", fast), ("stock", stock)):
        model.zero_grad()
        model.train()
        s = score_responses(model, prompts=PROMPTS, responses=RESPONSES, prompt_index=INDEX, pad_id=0)
        (s.logprobs.sum()).backward()
        out[name] = (s.logprobs.detach(), {k: p.grad.clone() for k, p in model.named_parameters()})
        model.eval()
    torch.testing.assert_close(out["fast"][0], out["stock"][0], atol=1e-6, rtol=1e-5)
    assert out["fast"][0].abs().sum() > 0
    for k, g in out["stock"][1].items():
        torch.testing.assert_close(out["fast"][1][k], g, atol=1e-6, rtol=1e-5, msg=k)


def test_greedy_rollouts_match_and_the_function_is_the_one_called(pair, monkeypatch):
    fast, stock = pair
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    a = TransformersRollout(fast, pad_id=0).generate(PROMPTS, n=2, params=params, seed=0)
    b = TransformersRollout(stock, pad_id=0).generate(PROMPTS, n=2, params=params, seed=0)
    assert a.response_ids == b.response_ids
    assert max(abs(x - y) for xs, ys in zip(a.sampler_logprobs, b.sampler_logprobs) for x, y in zip(xs, ys)) < 1e-5
    import torch.nn.functional as F

    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *x, **k: seen.append((k.get("enable_gqa"), k.get("attn_mask") is not None)) or real(*x, **k))
    TransformersRollout(fast, pad_id=0).generate(PROMPTS, n=1, params=SamplingParams(temperature=0.0, max_new_tokens=2),
                                                 seed=0)
    assert seen and all(gqa and masked for gqa, masked in seen), "masked calls must do GQA in the kernel, no K/V copy"


def test_only_grouped_query_sdpa_models_are_switched():
    mha, _ = build_tiny_model(num_heads=4, num_kv_heads=4)
    assert mha.config._attn_implementation == "sdpa" and not use_gqa_attention(mha)
    eager, _ = build_tiny_model(num_heads=4, num_kv_heads=2)
    eager.set_attn_implementation("eager")
    assert not use_gqa_attention(eager) and eager.config._attn_implementation == "eager"
