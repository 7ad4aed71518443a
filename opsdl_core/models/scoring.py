"""Per-token log-probs of given response token ids under a given prompt.

The student (prompt ``x_L``) and the teacher (prompt ``x_S``) score the *same token ids*:
responses are appended as ids, never decoded and re-tokenized. The LM head runs only at
response positions: prompts are prefilled once with ``logits_to_keep=1`` (the last prompt
position predicts the first response token), the KV cache is shared by the n responses of
a prompt, and the responses are then run on top of it. No ``[T_context, vocab]`` tensor is
ever built for the long context, and the long prompt is encoded once per prompt rather than
once per sample (gradients flow back through the shared cache).

The n responses of a prompt run as one packed row ``[y_1 | y_2 | … | y_n]`` on top of that prompt's
cache, with a block mask (each response sees the whole prompt and its own earlier tokens, never
another response), so the prompt's cache is not copied once per response (nor its gradient
scattered back in the backward). Models whose attention does not take a prepared 4-D mask (other
than SDPA) get the per-response layout instead; both give the same log-probs (tests).

A prefill can be made once and handed to both the rollout (which decodes from a detached copy of
its cache) and :func:`score_responses` (``prefilled=``): the trainer encodes the long prompt once
per step, with gradient, instead of once to sample and again to score.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from . import checkpointing
from .attention import NAME as GQA_ATTENTION
from .sharded import is_sharded

# attention implementations that take a prepared boolean [B, 1, Tq, Tk] mask as it is
_PACKABLE_ATTENTION = ("sdpa", GQA_ATTENTION)
_PLAIN_LAYERS = (DynamicLayer, checkpointing.ReplaySafeLayer)  # a ReplaySafeLayer is a DynamicLayer for everything else


@dataclass
class Scored:
    logprobs: torch.Tensor  # [B, R] float32 log p(y_t | prompt, y_<t); 0 at padding
    mask: torch.Tensor  # [B, R] bool, True at real response tokens
    response_ids: torch.Tensor  # [B, R] long, right-padded
    logits: torch.Tensor | None = None  # [B, R, V] float32 (temperature applied), only if asked


def _hf_model(model: Any) -> Any:
    """The transformers model under a PEFT / accelerate wrapper."""
    m = model
    for _ in range(4):
        if hasattr(m, "get_base_model"):
            m = m.get_base_model()
        elif hasattr(m, "module"):
            m = m.module
        else:
            break
    return m


def _cache_kwarg(model: Any) -> str:
    return _cache_kwarg_for(type(_hf_model(model)))


@functools.lru_cache(maxsize=None)
def _cache_kwarg_for(cls: type) -> str:
    """transformers 5 names the KV-cache argument ``cache``; older and remote-code models ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _out_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"):
    """Left-pad token id lists. Returns ids [N, L], attention [N, L] (long), positions [N, L], lengths [N]."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("every prompt must have at least one token")
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
        attn[i, L - len(s):] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    lengths = attn.sum(-1)
    return ids.to(device), attn.to(device), pos.to(device), lengths.to(device)


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"):
    """Right-pad token id lists. Returns ids [N, R] and mask [N, R] (bool)."""
    R = max(1, max((len(s) for s in seqs), default=1))
    ids = torch.full((len(seqs), R), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), R), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, : len(s)] = True
    return ids.to(device), mask.to(device)


@dataclass
class Prefilled:
    """Left-padded prompts encoded once: the logits at each prompt's last position (they predict the
    first new token), the KV cache, the attention mask over the prompt positions and the lengths.
    Made with gradient, its cache carries the gradient into whatever is scored on top of it; a cache is
    extended in place by the first call that runs on it, so a prefill is scored on once."""

    last_logits: torch.Tensor  # [P, V]
    cache: Any
    attention: torch.Tensor  # [P, Lp] long
    lengths: torch.Tensor  # [P]
    n_prompts: int


def prefill(model: Any, prompts: Sequence[Sequence[int]], *, pad_id: int) -> Prefilled:
    """Encode left-padded prompts once (the LM head at each prompt's last position only)."""
    device = next(model.parameters()).device
    ids, attn, pos, lengths = left_pad(prompts, pad_id, device)
    hf, extra = _hf_model(model), {}
    if checkpointing.is_enabled(hf) and hf.training:  # transformers would drop the cache; the layers are recomputed
        extra[_cache_kwarg(model)] = checkpointing.replay_safe_cache(hf.config)  # in the backward: a replay-safe one
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1, **extra)
    return Prefilled(out.logits[:, -1, :], _out_cache(out), attn, lengths, len(prompts))


def prefill_grouped(model: Any, prompts: Sequence[Sequence[int]], *, pad_id: int, max_tokens: int = 2048) -> Prefilled:
    """:func:`prefill` in groups of consecutive prompts of at most ``max_tokens`` padded tokens, assembled into
    one left-padded cache (no gradient: for sampling and greedy decoding).

    One forward over 8 prompts of ~1K tokens builds ``[8K, 1536]`` activations (slow to allocate and to stream
    on a CPU) and needs a padding mask in every attention call; a prompt that fills a group alone is encoded
    without padding, on the causal attention kernel. Short prompts still share a forward. The same keys,
    values and last logits as one :func:`prefill` of all of them (to float rounding), for models whose cache
    is transformers' plain dynamic one; others get :func:`prefill`."""
    groups: list[list[Sequence[int]]] = []
    longest = 0  # of the last group
    for p in prompts:
        if groups and (len(groups[-1]) + 1) * max(longest, len(p)) <= max_tokens:
            groups[-1].append(p)
            longest = max(longest, len(p))
        else:
            groups.append([p])
            longest = len(p)
    if len(groups) == 1:
        return prefill(model, prompts, pad_id=pad_id)
    parts = [prefill(model, g, pad_id=pad_id) for g in groups]
    if not all(plain_dynamic(pt.cache) for pt in parts):
        return prefill(model, prompts, pad_id=pad_id)
    P, L = len(prompts), max(pt.attention.shape[1] for pt in parts)
    attention = parts[0].attention.new_zeros((P, L))
    first = parts[0].cache.layers
    keys = [layer.keys.new_zeros((P, layer.keys.shape[1], L, layer.keys.shape[-1])) for layer in first]
    values = [layer.values.new_zeros((P, layer.values.shape[1], L, layer.values.shape[-1])) for layer in first]
    start = 0
    for pt in parts:  # right-aligned: each part's rows are left-padded to the longest prompt of all
        n, lp = pt.attention.shape
        attention[start:start + n, L - lp:] = pt.attention
        for k, v, layer in zip(keys, values, pt.cache.layers):
            k[start:start + n, :, L - lp:] = layer.keys
            v[start:start + n, :, L - lp:] = layer.values
        start += n
    layers = []
    for k, v in zip(keys, values):
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        layers.append(layer)
    cache = copy.copy(parts[0].cache)
    cache.layers = layers
    return Prefilled(torch.cat([pt.last_logits for pt in parts]), cache, attention,
                     torch.cat([pt.lengths for pt in parts]), P)


def step(model: Any, cache: Any, input_ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor,
         hidden: bool = False):
    """Run ``input_ids [B, T]`` on top of ``cache``; ``attention`` covers cache + new tokens. Returns the logits
    ``[B, T, V]`` (``hidden``: the LM head's input ``[B, T, H]`` instead, the head not run) and the cache."""
    with _HeadInput(model) if hidden else contextlib.nullcontext() as grab:
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                    **{_cache_kwarg(model): cache})
    return (grab.hidden if hidden else out.logits), _out_cache(out)


class _HeadInput:
    """A forward pre-hook on the model's LM head while the block runs: keeps the head's input (the final hidden
    states) and hands the head an empty slice of it, so the forward computes no logits."""

    def __init__(self, model: Any):
        self.head, self.hidden, self._handle = _hf_model(model).get_output_embeddings(), None, None

    def _hook(self, module: Any, args: tuple) -> tuple:
        self.hidden = args[0]
        return (args[0][..., :0, :],) + tuple(args[1:])

    def __enter__(self) -> "_HeadInput":
        self._handle = self.head.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


def _head_logprobs(head: Any, h: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(h).float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def chunked_logprobs(head: Any, hidden: torch.Tensor, y: torch.Tensor, *, temperature: float = 1.0,
                     chunk: int = 1024) -> torch.Tensor:
    """``log softmax(head(hidden) / temperature)`` at the tokens ``y``, ``chunk`` positions at a time: hidden
    ``[B, T, H]``, y ``[B, T]`` → ``[B, T]`` float32. With gradient, each chunk's head runs under non-reentrant
    checkpointing, so neither pass holds more than one ``[chunk, V]`` block of logits (the backward recomputes
    them chunk by chunk) where the plain head holds ``[B·T, V]`` logits and their log-softmax."""
    B, T, H = hidden.shape
    h, flat = hidden.reshape(B * T, H), y.reshape(B * T)
    parts = []
    for i in range(0, B * T, chunk):
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(torch.utils.checkpoint.checkpoint(_head_logprobs, head, h[i:i + chunk], flat[i:i + chunk],
                                                           temperature, use_reentrant=False))
        else:
            parts.append(_head_logprobs(head, h[i:i + chunk], flat[i:i + chunk], temperature))
    return (torch.cat(parts) if parts else h.new_zeros(0)).view(B, T)


def plain_head(model: Any) -> bool:
    """Whether the model's logits are its output embeddings applied to the head's input with nothing after (no
    soft-capping, scaling, ...): checked on a 3-token forward the first time a model is asked (the answer is
    kept on the model). Never on an FSDP-sharded model: its head's weight exists whole only inside the model's
    own forward and backward, so the head may not be called (or recomputed) outside them."""
    hf = _hf_model(model)
    known = hf.__dict__.get("_opsdl_plain_head")
    if known is None and is_sharded(model):
        known = False
    if known is None:
        head, known = hf.get_output_embeddings(), False
        if head is not None:
            was, seen = hf.training, []
            handle = head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))  # one forward
            hf.eval()
            try:
                ids = torch.tensor([[1, 2, 3]], device=next(hf.parameters()).device)
                with torch.no_grad():
                    ref = hf(input_ids=ids, use_cache=False).logits
                    known = bool(torch.allclose(head(seen[0]).float(), ref.float(), atol=1e-4, rtol=1e-4))
            finally:
                handle.remove()
                hf.train(was)
        hf.__dict__["_opsdl_plain_head"] = known
    return known


def score_responses(
    model: Any,
    *,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    prompt_index: Sequence[int],
    pad_id: int,
    return_logits: bool = False,
    temperature: float = 1.0,
    prefilled: Prefilled | None = None,
    packed: bool | None = None,
    head_chunk: int | None = 1024,
) -> Scored:
    """Log-probs of ``responses[b]`` as a continuation of ``prompts[prompt_index[b]]``.

    prompts:      P token-id lists (each encoded once).
    responses:    B token-id lists (the sampled answers, stop token included).
    prompt_index: B ints in [0, P): which prompt each response continues.
    prefilled:    ``prefill(model, prompts)`` made earlier (e.g. the one the rollout decoded from); its
                  cache is extended here, so it serves one call.
    packed:       run each prompt's responses as one packed row (default: wherever the model's attention
                  takes a prepared mask) rather than one row per response on a copy of the prompt's cache.
    head_chunk:   without ``return_logits``, the LM head runs over this many response positions at a time
                  (:func:`chunked_logprobs`: the ``[B·R, V]`` logits never exist at once, with or without
                  gradient), for models whose logits are the head's output as it is (:func:`plain_head`);
                  None: one head call over all positions.
    Gradients flow when called outside ``torch.no_grad``. Logits are computed only at the
    R response positions: ``[B, R, V]`` (+ ``[P, 1, V]`` for the prompts' last positions).
    """
    if len(responses) != len(prompt_index):
        raise ValueError(f"responses ({len(responses)}) and prompt_index ({len(prompt_index)}) differ in length")
    if any(not 0 <= g < len(prompts) for g in prompt_index):
        raise ValueError(f"prompt_index must lie in [0, {len(prompts)}), got {list(prompt_index)}")
    if prefilled is not None and prefilled.n_prompts != len(prompts):
        raise ValueError(f"prefilled holds {prefilled.n_prompts} prompts, got {len(prompts)}")
    device = next(model.parameters()).device
    y, mask = right_pad(responses, pad_id, device)  # [B, R]
    g = torch.as_tensor(list(prompt_index), dtype=torch.long, device=device)
    pre = prefilled if prefilled is not None else prefill(model, prompts, pad_id=pad_id)
    first = pre.last_logits[g].unsqueeze(1)  # [B, 1, V]: predicts y_0
    if packed is None and y.shape[1] > 1:
        packed = packable(model, pre.cache)
    run = _packed_rest if packed else _per_response_rest
    if head_chunk and not return_logits and y.shape[1] > 1 and plain_head(model):
        rest = run(model, pre, y, mask, list(prompt_index), pad_id, hidden=True)  # [B, R-1, H]
        lp = torch.cat([_head_logprobs(lambda x: x, first, y[:, :1], temperature),
                        chunked_logprobs(_hf_model(model).get_output_embeddings(), rest, y[:, 1:],
                                         temperature=temperature, chunk=head_chunk)], dim=1)
        return Scored(logprobs=lp * mask, mask=mask, response_ids=y)
    if y.shape[1] > 1:
        logits = torch.cat([first, run(model, pre, y, mask, list(prompt_index), pad_id)], dim=1)
    else:
        logits = first
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = F.log_softmax(logits, dim=-1)
    token_logp = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1) * mask
    return Scored(logprobs=token_logp, mask=mask, response_ids=y, logits=logits if return_logits else None)


def plain_dynamic(cache: Any) -> bool:
    """Whether ``cache`` is transformers' plain dynamic cache, every layer filled: the kind whose tensors can
    be sliced, copied, padded and packed directly (not sliding-window, quantized, offloaded, ... layers)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) in _PLAIN_LAYERS and layer.is_initialized for layer in layers)


def packable(model: Any, cache: Any) -> bool:
    """Whether several sequences can share a row on ``cache`` under a block mask: the model's attention takes a
    prepared boolean 4-D mask as it is, and the cache is :func:`plain_dynamic`."""
    impl = getattr(getattr(_hf_model(model), "config", None), "_attn_implementation", None)
    return impl in _PACKABLE_ATTENTION and plain_dynamic(cache)


def _per_response_rest(model: Any, pre: Prefilled, y: torch.Tensor, mask: torch.Tensor, index: list[int],
                       pad_id: int, hidden: bool = False) -> torch.Tensor:
    """Logits ``[B, R-1, V]`` at response positions 1.. (``hidden``: the head's input ``[B, R-1, H]``), one row
    per response on its own copy of its prompt's cache."""
    device = y.device
    g = torch.as_tensor(index, dtype=torch.long, device=device)
    pre.cache.batch_select_indices(g)  # [P, ...] -> [B, ...], each response gets its prompt's cache
    inp = y[:, :-1]  # [B, R-1]
    attention = torch.cat([pre.attention[g], mask[:, :-1].long()], dim=1)
    positions = pre.lengths[g].unsqueeze(1) + torch.arange(inp.shape[1], device=device).unsqueeze(0)
    rest, _ = step(model, pre.cache, inp, attention, positions, hidden=hidden)
    return rest


def _packed_rest(model: Any, pre: Prefilled, y: torch.Tensor, mask: torch.Tensor, index: list[int],
                 pad_id: int, hidden: bool = False) -> torch.Tensor:
    """Logits ``[B, R-1, V]`` (``hidden``: the head's input) at response positions 1.., the responses of each prompt packed in one row
    ``[y_1 | … | y_n]`` on that prompt's cache. Block j of row p holds the inputs of p's j-th response at
    positions ``len(p) + t``; a block sees the prompt's real tokens and its own real earlier inputs."""
    device = y.device
    T = y.shape[1] - 1
    P, Lp = pre.attention.shape
    slot, filled = [], [0] * P
    for p in index:  # the j-th response of prompt p goes to block j of row p
        slot.append(filled[p])
        filled[p] += 1
    M = max(filled) * T
    ids = torch.full((P, M), pad_id, dtype=torch.long, device=device)
    keys = torch.zeros((P, M), dtype=torch.bool, device=device)  # which packed inputs are real
    block = torch.full((P, M), -1, dtype=torch.long, device=device)  # which block a packed position is in
    rows = torch.as_tensor(index, dtype=torch.long, device=device)
    cols = torch.as_tensor(slot, dtype=torch.long, device=device).unsqueeze(1) * T + torch.arange(T, device=device)
    ids[rows.unsqueeze(1), cols] = y[:, :-1]
    keys[rows.unsqueeze(1), cols] = mask[:, :-1]
    block[rows.unsqueeze(1), cols] = torch.as_tensor(slot, device=device).unsqueeze(1).expand(-1, T)
    offset = torch.arange(M, device=device) % T
    positions = pre.lengths.unsqueeze(1) + offset.unsqueeze(0)  # [P, M]
    causal = offset.unsqueeze(1) >= offset.unsqueeze(0)  # [M, M] within a block: earlier or same position
    same = (block.unsqueeze(2) == block.unsqueeze(1)) & (block.unsqueeze(2) >= 0)  # [P, M, M]
    own = same & causal & keys.unsqueeze(1)
    prompt = pre.attention.bool().unsqueeze(1).expand(P, M, Lp)
    attention = torch.cat([prompt, own], dim=2).unsqueeze(1)  # [P, 1, M, Lp + M]
    out, _ = step(model, pre.cache, ids, attention, positions, hidden=hidden)  # [P, M, V or H]
    return out[rows.unsqueeze(1), cols]  # [B, T, V or H]
