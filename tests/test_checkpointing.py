"""Gradient checkpointing with the KV cache: the student's scoring (prompt encoded once into the cache, answers
on top of it) gives the log-probs and gradients it gives without checkpointing, packed and per-response, with
LoRA and with full fine-tuning; the recompute appends nothing to the cache; refused where it cannot hold."""

from __future__ import annotations

import copy

import pytest
import torch

from opsdl_core.models import checkpointing
from opsdl_core.models.rollout import SamplingParams, TransformersRollout
from opsdl_core.models.scoring import prefill, score_responses
from opsdl_core.models.tiny import build_tiny_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15, 16], [17, 18, 19, 20, 21]]
RESPONSES = [[30, 31, 32, 33], [34, 35], [36, 37, 38], [39, 40, 41, 42, 43]]
INDEX = [0, 0, 1, 2]


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(4)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B is zero at initialisation: make the adapter matter
    return peft


def _score(model, packed, shared=False):
    model.zero_grad()
    model.train()
    pre = prefill(model, PROMPTS, pad_id=0) if shared else None
    s = score_responses(model, prompts=PROMPTS, responses=RESPONSES, prompt_index=INDEX, pad_id=0, packed=packed,
                        prefilled=pre, return_logits=True)
    (s.logprobs.sum() + 0.01 * s.logits.pow(2).mean()).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.eval()
    return s.logprobs.detach(), grads


@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("packed", [True, False])
def test_scores_and_gradients_match_without_checkpointing(lora, packed):
    base, _ = build_tiny_model(seed=1, num_heads=4, num_kv_heads=2)
    plain = _lora(base) if lora else base
    ckpt = copy.deepcopy(plain)
    hf = ckpt.get_base_model() if lora else ckpt
    assert checkpointing.enable(hf) == hf.config.num_hidden_layers and checkpointing.is_enabled(hf)
    lp0, g0 = _score(plain, packed)
    lp1, g1 = _score(ckpt, packed, shared=True)
    torch.testing.assert_close(lp1, lp0, atol=1e-6, rtol=1e-5)
    assert set(g1) == set(g0) and g0
    assert any(g.abs().sum() > 0 for g in g0.values())
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-6, rtol=1e-4, msg=k)


def test_the_recompute_appends_nothing_and_the_cache_serves_decoding():
    model, _ = build_tiny_model(seed=2, num_heads=4, num_kv_heads=2)
    checkpointing.enable(model)
    model.train()
    pre = prefill(model, PROMPTS, pad_id=0)
    assert all(type(layer) is checkpointing.ReplaySafeLayer for layer in pre.cache.layers)
    lengths = [layer.keys.shape[-2] for layer in pre.cache.layers]
    assert lengths == [max(map(len, PROMPTS))] * len(lengths)
    # the rollout decodes from a detached copy of the prefill (eval mode: nothing checkpointed there)
    out = TransformersRollout(model, pad_id=0).generate(PROMPTS, n=2, params=SamplingParams(temperature=0, max_new_tokens=3),
                                                        seed=0, prefilled=pre)
    plain = TransformersRollout(copy.deepcopy(model), pad_id=0).generate(
        PROMPTS, n=2, params=SamplingParams(temperature=0, max_new_tokens=3), seed=0)
    assert out.response_ids == plain.response_ids
    model.train()
    pre.last_logits.sum().backward()  # the recompute of every layer runs here
    assert [layer.keys.shape[-2] for layer in pre.cache.layers] == lengths


def test_a_no_grad_forward_in_training_mode_keeps_its_cache():
    """transformers drops the cache of a checkpointed model in training mode; a prefill under no_grad there
    (nothing is recomputed) still gets one, and the same scores as in eval mode."""
    model, _ = build_tiny_model(seed=3)
    checkpointing.enable(model)
    with torch.no_grad():
        model.eval()
        ref = score_responses(model, prompts=PROMPTS, responses=RESPONSES, prompt_index=INDEX, pad_id=0).logprobs
        model.train()
        pre = prefill(model, PROMPTS, pad_id=0)
        assert pre.cache is not None and len(pre.cache.layers) == model.config.num_hidden_layers
        got = score_responses(model, prompts=PROMPTS, responses=RESPONSES, prompt_index=INDEX, pad_id=0).logprobs
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_a_sliding_window_cache_is_refused():
    from transformers import MistralConfig

    cfg = MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, sliding_window=4)
    with pytest.raises(ValueError, match="DynamicSlidingWindowLayer"):
        checkpointing.replay_safe_cache(cfg)


@pytest.mark.parametrize("lora", [True, False])
def test_the_trainer_with_checkpointing_takes_the_same_steps(tmp_path, lora):
    """``train.gradient_checkpointing`` in the trainer (shared prefill, sampler copy, base teacher): the same
    losses, gradient norms, answers and weights after three steps as without, with LoRA and full fine-tuning."""
    from test_trainer import make_trainer, tiny_cfg, trainable  # noqa: E402  (tests/ is on sys.path)

    out = {}
    for ck in (False, True):
        cfg = tiny_cfg(tmp_path / str(ck), lora={"enabled": lora}, train={"steps": 3, "gradient_checkpointing": ck})
        tr = make_trainer(cfg).setup(resume=False)
        assert checkpointing.is_enabled(tr.unwrapped.get_base_model() if lora else tr.unwrapped) == ck
        metrics = [tr.train_step() for _ in range(3)]
        out[ck] = ([(m["loss"], m["grad_norm"], m["response_len"]) for m in metrics], trainable(tr))
    for (l0, g0, r0), (l1, g1, r1) in zip(out[False][0], out[True][0]):
        assert r1 == r0
        assert l1 == pytest.approx(l0, rel=1e-4, abs=1e-6) and g1 == pytest.approx(g0, rel=1e-4, abs=1e-7)
    assert out[False][0][0][1] > 0
    for k, w in out[False][1].items():
        torch.testing.assert_close(out[True][1][k], w, atol=1e-5, rtol=1e-4, msg=k)
