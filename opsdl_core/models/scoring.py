"""Per-token log-probs of given response token ids under a given prompt.

The student (prompt ``x_L``) and the teacher (prompt ``x_S``) score the *same token ids*:
responses are appended as ids, never decoded and re-tokenized. The LM head runs only at
response positions: prompts are prefilled once with ``logits_to_keep=1`` (the last prompt
position predicts the first response token), the KV cache is shared by the n responses of
a prompt, and the responses are then run on top of it. No ``[T_context, vocab]`` tensor is
ever built for the long context, and the long prompt is encoded once per prompt rather than
once per sample (gradients flow back through the shared cache).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F


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


def prefill(model: Any, prompts: Sequence[Sequence[int]], *, pad_id: int):
    """Encode left-padded prompts once.

    Returns ``(last_logits [P, V], cache, attention [P, Lp], lengths [P])``; ``last_logits``
    are the logits at each prompt's last position (predicting the first new token).
    """
    device = next(model.parameters()).device
    ids, attn, pos, lengths = left_pad(prompts, pad_id, device)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :], _out_cache(out), attn, lengths


def step(model: Any, cache: Any, input_ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor):
    """Run ``input_ids [B, T]`` on top of ``cache``; ``attention`` covers cache + new tokens."""
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                **{_cache_kwarg(model): cache})
    return out.logits, _out_cache(out)


def score_responses(
    model: Any,
    *,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    prompt_index: Sequence[int],
    pad_id: int,
    return_logits: bool = False,
    temperature: float = 1.0,
) -> Scored:
    """Log-probs of ``responses[b]`` as a continuation of ``prompts[prompt_index[b]]``.

    prompts:      P token-id lists (each encoded once).
    responses:    B token-id lists (the sampled answers, stop token included).
    prompt_index: B ints in [0, P): which prompt each response continues.
    Gradients flow when called outside ``torch.no_grad``. Logits are computed only at the
    R response positions: ``[B, R, V]`` (+ ``[P, 1, V]`` for the prompts' last positions).
    """
    if len(responses) != len(prompt_index):
        raise ValueError(f"responses ({len(responses)}) and prompt_index ({len(prompt_index)}) differ in length")
    if any(not 0 <= g < len(prompts) for g in prompt_index):
        raise ValueError(f"prompt_index must lie in [0, {len(prompts)}), got {list(prompt_index)}")
    device = next(model.parameters()).device
    y, mask = right_pad(responses, pad_id, device)  # [B, R]
    g = torch.as_tensor(list(prompt_index), dtype=torch.long, device=device)
    last_logits, cache, attn, lengths = prefill(model, prompts, pad_id=pad_id)
    first = last_logits[g].unsqueeze(1)  # [B, 1, V]: predicts y_0
    if y.shape[1] > 1:
        cache.batch_select_indices(g)  # [P, ...] -> [B, ...], each response gets its prompt's cache
        inp = y[:, :-1]  # [B, R-1]
        attention = torch.cat([attn[g], mask[:, :-1].long()], dim=1)
        positions = lengths[g].unsqueeze(1) + torch.arange(inp.shape[1], device=device).unsqueeze(0)
        rest, _ = step(model, cache, inp, attention, positions)  # [B, R-1, V]
        logits = torch.cat([first, rest], dim=1)
    else:
        logits = first
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = F.log_softmax(logits, dim=-1)
    token_logp = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1) * mask
    return Scored(logprobs=token_logp, mask=mask, response_ids=y, logits=logits if return_logits else None)
