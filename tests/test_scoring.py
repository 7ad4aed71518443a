"""Scoring and rollout on a tiny random Llama: exactness against a plain full forward pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from opsdl_core.models.rollout import SamplingParams, TransformersRollout, sample_next
from opsdl_core.models.scoring import score_responses

V, PAD = 97, 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=PAD, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def _rand_ids(g, n):
    return torch.randint(3, V, (n,), generator=g).tolist()


def _full_forward_logprobs(model, prompt, response):
    """Reference: one unpadded forward over prompt+response, full-length logits."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0].float()  # [T, V]
    resp_logits = logits[len(prompt) - 1 : len(prompt) - 1 + len(response)]
    return resp_logits, F.log_softmax(resp_logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def test_response_logits_equal_full_forward_with_padding_and_shared_prompts(model):
    g = torch.Generator().manual_seed(1)
    prompts = [_rand_ids(g, 17), _rand_ids(g, 5), _rand_ids(g, 11)]
    responses = [_rand_ids(g, 6), _rand_ids(g, 1), _rand_ids(g, 9), _rand_ids(g, 3), _rand_ids(g, 6)]
    index = [0, 0, 1, 2, 2]
    with torch.no_grad():
        s = score_responses(model, prompts=prompts, responses=responses, prompt_index=index, pad_id=PAD,
                            return_logits=True)
    assert s.logprobs.shape == (5, 9) and s.logits.shape == (5, 9, V)
    for b, (gi, resp) in enumerate(zip(index, responses)):
        ref_logits, ref_lp = _full_forward_logprobs(model, prompts[gi], resp)
        n = len(resp)
        torch.testing.assert_close(s.logits[b, :n], ref_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s.logprobs[b, :n], ref_lp, atol=1e-5, rtol=1e-5)
        assert s.mask[b, :n].all() and not s.mask[b, n:].any()
        assert (s.logprobs[b, n:] == 0).all()
        assert s.response_ids[b, :n].tolist() == resp  # the exact ids, never re-tokenized


def test_lm_head_never_sees_the_prompt_positions(model):
    """The head's input has at most R (responses) or 1 (prompt) positions, never the prompt length."""
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    try:
        with torch.no_grad():
            score_responses(model, prompts=[list(range(3, 80))], responses=[[5, 6, 7]] * 2,
                            prompt_index=[0, 0], pad_id=PAD)
    finally:
        hook.remove()
    assert seen == [(1, 1, 32), (2, 2, 32)]  # prompt: last position only; responses: R-1 positions


def test_gradients_through_shared_prompt_match_separate_forwards(model):
    g = torch.Generator().manual_seed(2)
    prompt = _rand_ids(g, 12)
    responses = [_rand_ids(g, 4), _rand_ids(g, 2)]
    model.zero_grad()
    s = score_responses(model, prompts=[prompt], responses=responses, prompt_index=[0, 0], pad_id=PAD)
    s.logprobs.sum().backward()
    shared = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = sum(_full_forward_logprobs(model, prompt, r)[1].sum() for r in responses)
    total.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(shared[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    model.zero_grad()


def test_rollout_logprobs_match_scoring_and_stop(model):
    g = torch.Generator().manual_seed(3)
    prompts = [_rand_ids(g, 9), _rand_ids(g, 14)]
    engine = TransformersRollout(model, pad_id=PAD)
    params = SamplingParams(temperature=1.0, max_new_tokens=12, stop_token_ids=(5, 6, 7, 8))
    batch = engine.generate(prompts, n=3, params=params, seed=11)
    assert batch.prompt_index == [0, 0, 0, 1, 1, 1]
    with torch.no_grad():
        s = score_responses(model, prompts=prompts, responses=batch.response_ids,
                            prompt_index=batch.prompt_index, pad_id=PAD)
    for b, (ids, lps, why) in enumerate(zip(batch.response_ids, batch.sampler_logprobs, batch.finish_reasons)):
        assert len(ids) == len(lps) >= 1
        torch.testing.assert_close(torch.tensor(lps), s.logprobs[b, : len(ids)], atol=1e-4, rtol=1e-4)
        if why == "stop":
            assert ids[-1] in params.stop_token_ids and not set(ids[:-1]) & set(params.stop_token_ids)
        else:
            assert len(ids) == params.max_new_tokens
    again = engine.generate(prompts, n=3, params=params, seed=11)
    assert again.response_ids == batch.response_ids  # seeded: reproducible
    other = engine.generate(prompts, n=3, params=params, seed=12)
    assert other.response_ids != batch.response_ids


def test_greedy_rollout_equals_stepwise_argmax(model):
    prompt = list(range(10, 30))
    batch = TransformersRollout(model, pad_id=PAD).generate(
        [prompt], n=1, params=SamplingParams(temperature=0, max_new_tokens=6), seed=0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert batch.response_ids[0] == ids[len(prompt):]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, temperature=1.0, top_p=0.7, generator=gen)[0]) for _ in range(300)}
    assert picks == {0, 1}
