"""Scoring and rollout on a tiny random Llama: exactness against a plain full forward pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from opsdl_core.models.rollout import SamplingParams, TransformersRollout, sample_next
from opsdl_core.models.scoring import prefill, score_responses
from opsdl_core.models.tiny import build_tiny_model

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
                            prompt_index=[0, 0], pad_id=PAD, head_chunk=None)
    finally:
        hook.remove()
    # prompt: last position only; responses: R-1 positions each, the two packed in one row
    assert seen == [(1, 1, 32), (1, 4, 32)]


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


def test_draws_follow_the_probabilities_never_a_zero_one_and_repeat_with_the_seed():
    from opsdl_core.models.rollout import draw

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 2.0],
                          [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # rows need not sum to 1 (a nucleus' kept mass)
    N = 20_000
    gen = torch.Generator().manual_seed(3)
    toks = torch.stack([draw(probs, gen) for _ in range(N)])  # [N, 3]
    counts = torch.stack([torch.bincount(toks[:, r], minlength=6) for r in range(3)]).double()
    assert counts[:2, 0].sum() == counts[:, 2].sum() == counts[0, 5] == 0  # probability 0: never
    assert counts[1, 5] == N and counts[2, 0] == N
    expected = probs[0].double() / probs[0].sum() * N
    keep = expected > 0
    chi2 = (((counts[0] - expected)[keep]) ** 2 / expected[keep]).sum()
    assert chi2 < 13.8, chi2  # chi-square, 2 degrees of freedom: p = 0.001
    again = torch.Generator().manual_seed(3)
    assert torch.equal(torch.stack([draw(probs, again) for _ in range(50)]), toks[:50])


def _scored_with_grads(model, packed, prompts, responses, index, prefilled=False):
    model.zero_grad()
    pre = prefill(model, prompts, pad_id=PAD) if prefilled else None
    s = score_responses(model, prompts=prompts, responses=responses, prompt_index=index, pad_id=PAD,
                        return_logits=True, packed=packed, prefilled=pre)
    (s.logprobs.sum() + 0.1 * s.logits.logsumexp(-1)[s.mask].sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return s, grads


@pytest.mark.parametrize("seed", range(4))
def test_packed_responses_equal_one_row_per_response(model, seed):
    """Each prompt's answers packed in one row under a block mask give the log-probs, logits and gradients
    of one row per answer on a copy of the prompt's cache: left-padded prompts of different lengths,
    answers of different lengths (one of a single token), prompts with 0, 1 or 3 answers, in any order."""
    g = torch.Generator().manual_seed(10 + seed)
    prompts = [_rand_ids(g, n) for n in (13, 4, 9, 7)]
    lens = torch.randint(1, 9, (6,), generator=g).tolist()
    responses = [_rand_ids(g, n) for n in lens]
    index = [2, 0, 2, 1, 2, 0]  # prompt 3 has no answer
    one, g_one = _scored_with_grads(model, False, prompts, responses, index)
    packed, g_packed = _scored_with_grads(model, True, prompts, responses, index)
    torch.testing.assert_close(packed.logprobs, one.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.logits[packed.mask], one.logits[one.mask], atol=1e-5, rtol=1e-5)
    for n in g_one:
        torch.testing.assert_close(g_packed[n], g_one[n], atol=1e-5, rtol=1e-4, msg=n)
    for b, (gi, resp) in enumerate(zip(index, responses)):  # and both are the plain full forward's
        torch.testing.assert_close(packed.logprobs[b, :len(resp)], _full_forward_logprobs(model, prompts[gi], resp)[1],
                                   atol=1e-5, rtol=1e-5)


def test_scoring_on_a_given_prefill_equals_scoring_from_scratch(model):
    """``prefilled=``: the answers run on a prefill made before (with gradient) give the same log-probs
    and gradients as a call that encodes the prompts itself; a prefill of other prompts is refused."""
    g = torch.Generator().manual_seed(5)
    prompts = [_rand_ids(g, 11), _rand_ids(g, 6)]
    responses = [_rand_ids(g, 5), _rand_ids(g, 3), _rand_ids(g, 7)]
    index = [0, 1, 1]
    fresh, g_fresh = _scored_with_grads(model, None, prompts, responses, index)
    given, g_given = _scored_with_grads(model, None, prompts, responses, index, prefilled=True)
    torch.testing.assert_close(given.logprobs, fresh.logprobs, atol=1e-6, rtol=1e-6)
    for n in g_fresh:
        torch.testing.assert_close(g_given[n], g_fresh[n], atol=1e-6, rtol=1e-5, msg=n)
    with pytest.raises(ValueError, match="prefilled holds 2 prompts"):
        score_responses(model, prompts=prompts[:1], responses=responses[:1], prompt_index=[0], pad_id=PAD,
                        prefilled=prefill(model, prompts, pad_id=PAD))


def test_rollout_from_a_gradient_prefill_samples_what_a_fresh_rollout_samples(model):
    """The trainer's shared prefill: decoding from a detached copy of a prefill made with gradient gives the
    same tokens and sampler log-probs as a rollout that encodes the prompts itself (same seed), leaves the
    prefill's cache as it was (the student scores on it next) and lets no gradient into the decode."""
    g = torch.Generator().manual_seed(6)
    prompts = [_rand_ids(g, 15), _rand_ids(g, 8), _rand_ids(g, 12)]
    params = SamplingParams(temperature=1.0, max_new_tokens=10, stop_token_ids=(5, 6))
    engine = TransformersRollout(model, pad_id=PAD, max_batch_size=4)  # 2 prompts x 2 samples per chunk
    fresh = engine.generate(prompts, n=2, params=params, seed=3)
    pre = prefill(model, prompts, pad_id=PAD)
    shapes = [tuple(layer.keys.shape) for layer in pre.cache.layers]
    shared = engine.generate(prompts, n=2, params=params, seed=3, prefilled=pre)
    assert shared.response_ids == fresh.response_ids and shared.prompt_index == fresh.prompt_index
    torch.testing.assert_close(torch.tensor(sum(shared.sampler_logprobs, [])),
                               torch.tensor(sum(fresh.sampler_logprobs, [])), atol=1e-6, rtol=1e-6)
    assert [tuple(layer.keys.shape) for layer in pre.cache.layers] == shapes
    assert all(layer.keys.requires_grad for layer in pre.cache.layers)
    s = score_responses(model, prompts=prompts, responses=shared.response_ids, prompt_index=shared.prompt_index,
                        pad_id=PAD, prefilled=pre)
    s.logprobs.sum().backward()  # the graph of the prefill is intact after the decode
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_packed_decode_samples_what_one_row_per_sample_samples(model, monkeypatch, temperature):
    """The n samples of a prompt decoding in one packed row (block mask) give the tokens, sampler log-probs
    and finish reasons of one row per sample on a copy of the cache: left-padded prompts, samples that
    stop at different steps (stop tokens), the same seed."""
    import opsdl_core.models.rollout as rollout_mod

    g = torch.Generator().manual_seed(7)
    prompts = [_rand_ids(g, 15), _rand_ids(g, 6), _rand_ids(g, 10)]
    params = SamplingParams(temperature=temperature, max_new_tokens=9, stop_token_ids=(5, 6, 7, 8, 9))
    engine = TransformersRollout(model, pad_id=PAD, max_batch_size=8)  # 2 prompts x 4 samples per chunk
    packed = engine.generate(prompts, n=4, params=params, seed=4)
    monkeypatch.setattr(rollout_mod, "packable", lambda *a: False)
    rows = engine.generate(prompts, n=4, params=params, seed=4)
    assert packed.response_ids == rows.response_ids and packed.finish_reasons == rows.finish_reasons
    assert len({len(r) for r in rows.response_ids}) > 1  # the samples really end at different steps
    torch.testing.assert_close(torch.tensor(sum(packed.sampler_logprobs, [])),
                               torch.tensor(sum(rows.sampler_logprobs, [])), atol=1e-5, rtol=1e-5)


def test_grouped_prefill_equals_one_batched_prefill(model, monkeypatch):
    """Prompts encoded in groups of at most ``max_tokens`` padded tokens and assembled into one left-padded
    cache give the keys and values (at real positions), last logits, mask and lengths of one batched prefill,
    and the same greedy answers when decoded."""
    from opsdl_core.models.scoring import prefill_grouped

    g = torch.Generator().manual_seed(8)
    prompts = [_rand_ids(g, n) for n in (30, 28, 5, 6, 4, 31)]
    import opsdl_core.models.scoring as scoring_mod

    calls = []
    monkeypatch.setattr(scoring_mod, "prefill",
                        lambda m, p, pad_id: calls.append(len(p)) or prefill(m, p, pad_id=pad_id))
    with torch.no_grad():
        one = prefill(model, prompts, pad_id=PAD)
        grouped = prefill_grouped(model, prompts, pad_id=PAD, max_tokens=40)
    assert calls == [1, 1, 3, 1]  # [30], [28], [5, 6, 4], [31]
    assert torch.equal(grouped.attention, one.attention) and torch.equal(grouped.lengths, one.lengths)
    torch.testing.assert_close(grouped.last_logits, one.last_logits, atol=1e-5, rtol=1e-5)
    real = one.attention.bool()
    for a, b in zip(grouped.cache.layers, one.cache.layers):
        torch.testing.assert_close(a.keys.transpose(1, 2)[real], b.keys.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values.transpose(1, 2)[real], b.values.transpose(1, 2)[real], atol=1e-5,
                                   rtol=1e-5)
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    grouped_answers = TransformersRollout(model, pad_id=PAD, max_batch_size=8, prefill_tokens=40).generate(
        prompts, n=1, params=params, seed=0).response_ids
    one_answers = TransformersRollout(model, pad_id=PAD, max_batch_size=8, prefill_tokens=10**6).generate(
        prompts, n=1, params=params, seed=0).response_ids
    assert grouped_answers == one_answers and all(len(a) == 8 for a in one_answers)


def test_a_prefill_with_another_cache_kind_is_encoded_again_not_copied(model):
    """A prefill whose cache is not transformers' plain dynamic one (sliding-window, quantized, ... layers:
    stood in for here by preallocated layers) is not decoded from: the rollout encodes the prompts itself
    and samples what a fresh rollout samples."""
    from opsdl_core.models.rollout import PreallocatedLayer

    g = torch.Generator().manual_seed(9)
    prompts = [_rand_ids(g, 12), _rand_ids(g, 7)]
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    engine = TransformersRollout(model, pad_id=PAD)
    fresh = engine.generate(prompts, n=2, params=params, seed=5)
    with torch.no_grad():
        pre = prefill(model, prompts, pad_id=PAD)
    pre.cache.layers = [PreallocatedLayer(layer.keys, layer.values, 0) for layer in pre.cache.layers]
    assert engine.generate(prompts, n=2, params=params, seed=5, prefilled=pre).response_ids == fresh.response_ids


def test_the_head_in_chunks_gives_the_same_logprobs_and_gradients_and_never_sees_all_positions():
    """``head_chunk``: the LM head over a few response positions at a time (checkpointed with gradient) gives
    the one-call head's log-probs and gradients; no head call computes more rows of logits than the chunk
    (the prefill's are one per prompt)."""
    from opsdl_core.models.scoring import plain_head

    model, _ = build_tiny_model(seed=6, num_heads=4, num_kv_heads=2)
    assert plain_head(model)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    responses = [[20, 21, 22, 23, 24, 25], [26, 27], [28, 29, 30, 31]]
    index = [0, 0, 1]
    rows = []
    handle = model.get_output_embeddings().register_forward_hook(  # rows of logits each head call computed
        lambda m, a, o: rows.append(o.numel() // o.shape[-1]))
    out = {}
    for chunk in (None, 3):
        for packed in (True, False):
            model.zero_grad()
            model.train()
            rows.clear()
            s = score_responses(model, prompts=prompts, responses=responses, prompt_index=index, pad_id=0,
                                packed=packed, head_chunk=chunk, temperature=0.7)
            s.logprobs.sum().backward()
            out[chunk, packed] = (s.logprobs.detach(), {k: p.grad.clone() for k, p in model.named_parameters()})
            assert max(rows) <= 3 if chunk else max(rows) > 3, rows  # chunks of 3, and the prefill's last positions (one per prompt)
    handle.remove()
    model.eval()
    for packed in (True, False):
        torch.testing.assert_close(out[3, packed][0], out[None, packed][0], atol=1e-6, rtol=1e-5)
        for k, g in out[None, packed][1].items():
            torch.testing.assert_close(out[3, packed][1][k], g, atol=2e-5, rtol=1e-5, msg=k)  # sums of ~5


def test_a_model_whose_logits_are_post_processed_is_not_chunked():
    from opsdl_core.models.scoring import plain_head

    model, _ = build_tiny_model(seed=7)
    orig = type(model).forward

    class Capped(type(model)):
        def forward(self, *a, **kw):
            out = orig(self, *a, **kw)
            out.logits = 30 * torch.tanh(out.logits / 30)  # soft-capping, as Gemma 2 does
            return out

    model.__class__ = Capped
    assert not plain_head(model)


def test_decoding_runs_on_decode_threads_and_the_prefill_on_all_of_them(model, monkeypatch):
    """``decode_threads``: the prompt's prefill runs on the process's torch threads, decode steps that feed at
    most FEW_DECODE_TOKENS tokens on ``decode_threads`` of them, wider steps on all; the count is restored
    afterwards (also when the decode fails), the samples are those of a rollout on the process's threads, and
    0 or a count >= the process's leaves it alone; so does a process whose ``torch.set_num_threads`` an in-process
    vLLM CPU engine has replaced (it bound the threads to cores)."""
    from opsdl_core.models.rollout import FEW_DECODE_TOKENS

    # An in-process vLLM engine of an earlier test in this process replaces torch.set_num_threads for good.
    monkeypatch.setattr(torch, "set_num_threads", torch._C.set_num_threads)

    seen: list[tuple[int, int, int]] = []  # (rows, tokens fed per row, torch threads) per forward
    hook = model.register_forward_pre_hook(
        lambda mod, args, kw: seen.append((*kw["input_ids"].shape, torch.get_num_threads())), with_kwargs=True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(8)
        prompts = [_rand_ids(g, 14), _rand_ids(g, 9)]
        params = SamplingParams(temperature=1.0, max_new_tokens=6)

        def run(threads, batch=FEW_DECODE_TOKENS, n=FEW_DECODE_TOKENS):
            seen.clear()
            out = TransformersRollout(model, pad_id=PAD, max_batch_size=batch, decode_threads=threads).generate(
                prompts, n=n, params=params, seed=2)
            return out, {t for _, T, t in seen if T > n}, {t for _, T, t in seen if T <= n}

        one, prefill_threads, decode_threads = run(1)  # one prompt x 4 samples per chunk
        assert prefill_threads == {2} and decode_threads == {1} and torch.get_num_threads() == 2
        mine, prefill_threads, decode_threads = run(0)
        assert prefill_threads == decode_threads == {2}
        assert one.response_ids == mine.response_ids
        torch.testing.assert_close(torch.tensor(sum(one.sampler_logprobs, [])),
                                   torch.tensor(sum(mine.sampler_logprobs, [])), atol=1e-5, rtol=1e-5)
        assert run(4)[2] == {2}  # not more than the process has
        assert run(1, batch=2 * FEW_DECODE_TOKENS)[2] == {2}  # two prompts x 4 samples: 8 tokens a step
        boom = model.register_forward_pre_hook(lambda mod, args, kw: (_ for _ in ()).throw(RuntimeError("x"))
                                               if kw["input_ids"].shape[1] <= FEW_DECODE_TOKENS else None,
                                               with_kwargs=True)
        try:
            with pytest.raises(RuntimeError, match="x"):
                run(1)
        finally:
            boom.remove()
        assert torch.get_num_threads() == 2
        calls: list[int] = []
        with monkeypatch.context() as m:
            m.setattr(torch, "set_num_threads", calls.append)  # what vLLM's CPU worker leaves behind
            assert run(1)[1:] == ({2}, {2}) and calls == []
    finally:
        hook.remove()
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="decode_threads"):
        TransformersRollout(model, pad_id=PAD, decode_threads=-1)
