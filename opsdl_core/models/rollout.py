"""On-policy rollout behind a small interface, and its transformers backend.

An engine samples ``n`` answers per prompt from the weights the trainer has *now*, and
returns the token ids, the sampler's per-token log-probs and why each answer ended::

    engine = TransformersRollout(model, pad_id=tok.pad_token_id)
    batch = engine.generate(prompts, n=4, params=SamplingParams(max_new_tokens=32, stop_token_ids=(2,)), seed=7)
    engine.update_weights(version=step)   # after every optimizer step

The sampler log-probs are those of the *untempered* model at the sampled tokens (what the
trainer computes), so comparing them with the trainer's log-probs is a health check of the
weight sync, and they serve the importance ratio of the loss.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from .scoring import Prefilled, packable, plain_dynamic, prefill_grouped, step


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 32
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class RolloutBatch:
    prompt_index: list[int]  # [B] which prompt each sample answers (samples of a prompt are contiguous)
    response_ids: list[list[int]]  # B lists of token ids, the stop token included when it stopped
    sampler_logprobs: list[list[float]]  # B lists aligned with response_ids (untempered model)
    finish_reasons: list[str]  # B values: "stop" | "length"
    weight_version: int = 0

    def __len__(self) -> int:
        return len(self.response_ids)


class RolloutEngine(Protocol):
    """What the trainer needs from a sampler (transformers here; vLLM behind the same calls)."""

    weight_version: int

    def generate(self, prompts: Sequence[Sequence[int]], *, n: int, params: SamplingParams, seed: int) -> RolloutBatch: ...

    def update_weights(self, version: int, state_dict: dict[str, torch.Tensor] | None = None) -> None: ...

    def release(self) -> None: ...


def sample_next(logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator | None):
    """Pick one token per row of ``logits [B, V]``; returns ``(tokens [B], untempered logprobs [B])``."""
    logits = logits.float()
    logp = F.log_softmax(logits, dim=-1)
    if temperature == 0:
        tok = logits.argmax(-1)
    else:
        probs = F.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, idx = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the top token
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        tok = draw(probs, generator)
    return tok, logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of ``probs [B, V]`` (non-negative, any positive sum), drawn in proportion to it: one
    uniform number per row against the row's cumulative sum (float64). ``torch.multinomial`` draws one
    exponential number per vocabulary entry instead (~4 ms for 4 rows of a 49K vocabulary on a CPU, ~5% of a
    decode step). An entry of probability 0 is never drawn (the first index whose cumulative sum exceeds the
    uniform point, which lies below the row's total)."""
    cum = probs.double().cumsum(-1)
    u = torch.rand((probs.shape[0], 1), generator=generator, dtype=torch.float64, device=probs.device)
    tok = torch.searchsorted(cum, u * cum[:, -1:], right=True).squeeze(-1)
    return tok.clamp_(max=probs.shape[-1] - 1)


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer with room reserved up front: decoding writes in place, no per-token copy.
    ``repeat``: each row of ``keys``/``values`` is repeated that many times (one copy, into the new buffer)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, extra: int, repeat: int = 1):
        super().__init__()
        B, H, L, _ = keys.shape
        self._k = keys.new_empty((B * repeat, H, L + extra, keys.shape[-1]))
        self._v = values.new_empty((B * repeat, H, L + extra, values.shape[-1]))
        for buf, src in ((self._k, keys), (self._v, values)):
            buf.view(B, repeat, *buf.shape[1:])[:, :, :, :L] = src.unsqueeze(1)
        self._len = L
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.keys, self.values = self._k[:, :, :L], self._v[:, :, :L]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self._len + key_states.shape[-2]
        if end > self._k.shape[2]:  # out of room: grow like a DynamicLayer
            self._k = torch.cat([self._k[:, :, : self._len], key_states], dim=-2)
            self._v = torch.cat([self._v[:, :, : self._len], value_states], dim=-2)
        else:
            self._k[:, :, self._len : end] = key_states
            self._v[:, :, self._len : end] = value_states
        self._len = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values


def preallocate_cache(cache: Any, extra_tokens: int, repeat: int = 1) -> Any:
    """Give each layer of a filled ``DynamicCache`` room for ``extra_tokens`` more positions (each row
    repeated ``repeat`` times), in place.

    A ``DynamicCache`` grows by ``torch.cat``, copying the whole cache at every decoded token
    (O(T) per token: ~30% of a decode step at 1K context on a CPU). Caches of other kinds
    (sliding windows, quantized, ...) are only repeated.
    """
    if not plain_dynamic(cache):
        if repeat > 1:
            cache.batch_repeat_interleave(repeat)
        return cache
    cache.layers = [PreallocatedLayer(layer.keys, layer.values, extra_tokens, repeat) for layer in cache.layers]
    return cache


def decode_cache(pre: Prefilled, rows: slice, extra_tokens: int, repeat: int = 1) -> Any:
    """A new cache to decode from: ``rows`` of a prefill's cache (each repeated ``repeat`` times), detached
    (no gradient reaches the prefill from the decode), with room for ``extra_tokens`` more positions. The
    prefill's own cache is left as it was (the student's scoring runs on it next)."""
    if not plain_dynamic(pre.cache):
        raise ValueError("decoding from a prefill needs a cache of filled DynamicLayers, got "
                         f"{type(pre.cache).__name__}")
    out = copy.copy(pre.cache)
    out.layers = [PreallocatedLayer(layer.keys[rows].detach(), layer.values[rows].detach(), extra_tokens, repeat)
                  for layer in pre.cache.layers]
    return out


def merged_lora_weights(peft_model: Any) -> dict[str, torch.Tensor]:
    """``{name in the plain model: W + ΔW}`` for every LoRA-adapted weight of a PEFT model.

    Computed from the frozen base weight each time (never merged in place), so repeated syncs
    do not drift. ~2·r·Σ(d_in·d_out) flops: about 30 ms for SmolLM2-135M at r=16 on a CPU.
    """
    from peft.tuners.lora import LoraLayer

    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in peft_model.get_base_model().named_modules():
            if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
                w = module.base_layer.weight
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        w = w + module.get_delta_weight(adapter).to(w.dtype)
                out[f"{name}.weight"] = w.detach()
    return out


def merge_lora_into(peft_model: Any, target: Any) -> int:
    """Write ``W + ΔW`` of every LoRA-adapted weight of ``peft_model`` straight into the parameter of the same
    name of ``target`` (a plain copy of the model, e.g. the merged sampler): one ``addmm`` into the target's
    storage per weight, where building :func:`merged_lora_weights` and copying it allocates and writes every
    merged weight twice. Layers the one-matmul form does not cover get :func:`merged_lora_weights`'s value.
    Returns the number of weights written."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    params = dict(target.named_parameters())
    fallback = None
    n = 0
    with torch.no_grad():
        for name, module in peft_model.get_base_model().named_modules():
            if not hasattr(module, "base_layer") or not hasattr(module, "lora_A"):
                continue
            dst = params[f"{name}.weight"]
            active = [a for a in module.active_adapters if a in module.lora_A]
            W = module.base_layer.weight
            a = active[0] if len(active) == 1 else None
            if (type(module) is LoraLinear and a is not None and not module.fan_in_fan_out
                    and a not in module.lora_variant and dst.dtype == W.dtype == module.lora_A[a].weight.dtype):
                torch.addmm(W, module.lora_B[a].weight, module.lora_A[a].weight, alpha=module.scaling[a], out=dst)
            else:
                fallback = merged_lora_weights(peft_model) if fallback is None else fallback
                dst.copy_(fallback[f"{name}.weight"])
            n += 1
    return n


def sampler_weights(model: Any) -> dict[str, torch.Tensor]:
    """Every parameter of the plain model (names as in its checkpoint), LoRA adapters merged in:
    what an engine that holds its own copy of the weights (vLLM) must be sent after a step."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return {k: p.detach() for k, p in model.named_parameters()}
    merged = merged_lora_weights(model)
    out: dict[str, torch.Tensor] = {}
    for name, p in model.get_base_model().named_parameters():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        out[name] = merged.get(name, p.detach())
    return out


# A decode step that feeds at most this many tokens runs on ``decode_threads`` (see :func:`cpu_threads`).
FEW_DECODE_TOKENS = 4


def thread_count_settable() -> bool:
    """Whether ``torch.set_num_threads`` is torch's own: vLLM's CPU worker replaces it process-wide once it has
    bound the OpenMP threads to cores (``vllm/v1/worker/cpu_worker.py``), and changing the count behind its
    back would undo that binding."""
    return torch.set_num_threads is torch._C.set_num_threads


@contextlib.contextmanager
def cpu_threads(n: int, device: torch.device):
    """Run the block on at most ``n`` torch threads when ``device`` is the CPU (``n`` 0: unchanged); restored after.

    A decode step is ~25 small operators per layer (a 30-layer model: ~750 per token). Under
    ``OMP_WAIT_POLICY=PASSIVE`` (what the project's processes set, so that idle OpenMP workers never take the
    cores another process needs) every parallel operator wakes its sleeping workers first; at a few rows that
    costs more than the second core gains. On the 2-core machine of the measurement
    (``benchmarks/bench_rollout.py --decode-threads``), one thread decoded 1 prompt x 4 packed samples of
    1,074 tokens at 68 ms per step against 96 on two (0.71x; 0.85x in a second run, 0.90x beside a competing
    process), but 2 x 4 at 1.10x, 8 x 1 at 1.03x and 8 x 4 at 1.24–1.33x: so only steps of at most
    :data:`FEW_DECODE_TOKENS` tokens take it.
    The prompt's prefill keeps every thread.

    An in-process vLLM CPU engine binds the process's OpenMP threads to its cores and replaces
    ``torch.set_num_threads`` with a function that only warns; after that the block runs on the bound
    threads, unchanged (:func:`thread_count_settable`)."""
    before = torch.get_num_threads()
    if device.type != "cpu" or n <= 0 or n >= before or not thread_count_settable():
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TransformersRollout:
    """Batched sampling with a KV cache on a transformers model (shared with the trainer).

    Each prompt is prefilled once and its cache repeated for its ``n`` samples. Sampling
    draws from an explicit ``torch.Generator`` seeded per call, so a rollout is a function
    of (weights, prompts, params, seed): resumed runs reproduce it exactly. ``decode_threads``: torch
    threads on a CPU for decode steps that feed at most :data:`FEW_DECODE_TOKENS` tokens (:func:`cpu_threads`;
    0: the process's own).
    """

    def __init__(self, model: Any, *, pad_id: int, max_batch_size: int = 16, prefill_tokens: int = 2048,
                 decode_threads: int = 1):
        if decode_threads < 0:
            raise ValueError(f"decode_threads must be >= 0, got {decode_threads}")
        self.model = model
        self.pad_id = int(pad_id)
        self.max_batch_size = max_batch_size
        self.prefill_tokens = prefill_tokens  # padded tokens per prefill forward (prefill_grouped)
        self.decode_threads = int(decode_threads)
        self.weight_version = 0

    def update_weights(self, version: int, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The model object is the trainer's, so its weights are current; a state dict is loaded in place."""
        if state_dict is not None:
            missing = set(state_dict) - set(dict(self.model.named_parameters()))
            if missing:
                raise KeyError(f"update_weights: unknown parameter names {sorted(missing)[:5]}")
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for k, v in state_dict.items():
                    params[k].copy_(v)
        self.weight_version = int(version)

    def release(self) -> None:
        self.model = None

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], *, n: int, params: SamplingParams, seed: int,
                 prefilled: Prefilled | None = None) -> RolloutBatch:
        """``n`` samples per prompt. ``prefilled``: these prompts already encoded (``prefill`` on the same
        weights, e.g. the trainer's with gradient): decoding starts from a detached copy of its cache and
        its last logits instead of encoding the prompts again (a cache of another kind than transformers'
        plain dynamic one, e.g. sliding-window layers, is not copied: the prompts are encoded here)."""
        if prefilled is not None and not plain_dynamic(prefilled.cache):
            prefilled = None
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if self.model is None:
            raise RuntimeError("this rollout engine was released")
        was_training = self.model.training
        self.model.eval()
        # on the model's device: torch.rand refuses a generator of another device
        gen = torch.Generator(device=next(self.model.parameters()).device).manual_seed(int(seed))
        per_chunk = max(1, self.max_batch_size // n)
        out = RolloutBatch([], [], [], [], self.weight_version)
        try:
            for start in range(0, len(prompts), per_chunk):
                chunk = prompts[start : start + per_chunk]
                rows = slice(start, start + len(chunk))
                ids, lps, reasons = self._generate_chunk(chunk, n, params, gen, prefilled, rows)
                out.prompt_index += [start + i // n for i in range(len(ids))]
                out.response_ids += ids
                out.sampler_logprobs += lps
                out.finish_reasons += reasons
        finally:
            self.model.train(was_training)
        return out

    def _generate_chunk(self, prompts, n: int, params: SamplingParams, gen: torch.Generator,
                        prefilled: Prefilled | None = None, rows: slice = slice(None)):
        """Sample ``n`` answers for each of ``prompts`` (``prefilled``: all the call's prompts encoded
        already; this chunk is ``rows`` of it, decoded from a detached copy of its cache).

        Where the model's attention takes a prepared mask, the ``n`` samples of a prompt decode *packed*:
        one row per prompt whose step ``t`` feeds the n samples' tokens at the same position, each
        seeing the prompt and only its own earlier tokens (a block mask), so the prompt's cache is
        neither copied per sample nor read once per sample at every step. Otherwise each sample decodes
        in its own row on a copy of the cache. The same tokens either way (tests)."""
        model = self.model
        device = next(model.parameters()).device
        P, B, steps = len(prompts), len(prompts) * n, params.max_new_tokens
        if prefilled is None:
            pre = prefill_grouped(model, prompts, pad_id=self.pad_id, max_tokens=self.prefill_tokens)
            packed = n > 1 and packable(model, pre.cache)
            cache = preallocate_cache(pre.cache, n * steps if packed else steps, 1 if packed else n)
        else:
            pre = Prefilled(prefilled.last_logits[rows].detach(), prefilled.cache, prefilled.attention[rows],
                            prefilled.lengths[rows], P)
            packed = n > 1 and packable(model, pre.cache)
            cache = decode_cache(prefilled, rows, n * steps if packed else steps, 1 if packed else n)
        logits, attn, lengths = pre.last_logits, pre.attention, pre.lengths
        if n > 1:
            logits = logits.repeat_interleave(n, dim=0)  # [B, V], samples of a prompt contiguous
            if not packed:
                attn, lengths = attn.repeat_interleave(n, dim=0), lengths.repeat_interleave(n, dim=0)
        if packed:  # the block mask: query j (sample j of its prompt) sees the keys of sample j only
            prompt_keys = attn.bool().unsqueeze(1).expand(P, n, attn.shape[1])  # [P, n, Lp]
            own = torch.eye(n, dtype=torch.bool, device=device)  # [n, n] per step
            new_keys = torch.zeros((P, 0), dtype=torch.bool, device=device)  # [P, n*t] which fed tokens are real
        stop = torch.tensor(sorted(params.stop_token_ids), dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        toks, lps = [], []
        with cpu_threads(self.decode_threads if B <= FEW_DECODE_TOKENS else 0, device):
            for t in range(steps):
                tok, lp = sample_next(logits, temperature=params.temperature, top_p=params.top_p,
                                      generator=gen)
                tok = torch.where(done, torch.full_like(tok, self.pad_id), tok)
                toks.append(tok)
                lps.append(lp)
                newly = torch.isin(tok, stop) & ~done if len(stop) else torch.zeros_like(done)
                done = done | newly
                if bool(done.all()) or t == steps - 1:
                    break
                real = ~done | newly  # the token fed now is a real key (a finished sample feeds padding)
                if packed:
                    new_keys = torch.cat([new_keys, real.view(P, n)], dim=1)
                    mask = torch.cat([prompt_keys, own.repeat(1, t + 1).unsqueeze(0) & new_keys.unsqueeze(1)], dim=2)
                    pos = (lengths + t).unsqueeze(1).expand(P, n)
                    logits, cache = step(model, cache, tok.view(P, n), mask.unsqueeze(1), pos)
                    logits = logits.reshape(B, -1)
                else:
                    attn = torch.cat([attn, real.long().unsqueeze(1)], dim=1)
                    pos = (lengths + t).unsqueeze(1)
                    logits, cache = step(model, cache, tok.unsqueeze(1), attn, pos)
                    logits = logits[:, -1, :]
        T = torch.stack(toks, 1).tolist()
        L = torch.stack(lps, 1).tolist()
        stop_set = set(params.stop_token_ids)
        ids_out, lps_out, reasons = [], [], []
        for b in range(B):
            seq, lp = [], []
            reason = "length"
            for tok, l in zip(T[b], L[b]):
                seq.append(tok)
                lp.append(l)
                if tok in stop_set:
                    reason = "stop"
                    break
            ids_out.append(seq)
            lps_out.append(lp)
            reasons.append(reason)
        return ids_out, lps_out, reasons
