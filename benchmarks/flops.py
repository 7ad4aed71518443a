"""FLOP counts and a matmul peak, shared by the benchmarks (``bench_eval.py``, ``bench_vs_trl.py``)."""

from __future__ import annotations

import time


def matmul_peak(threads: int, dtype: str = "float32") -> float:
    """FLOP/s of a 2048^3 matmul on ``threads`` torch threads, best of 5 (after 2 warm-up calls), by the faster of
    the CPU's two GEMM libraries in PyTorch: ``torch.mm`` (MKL on x86 in float32) and oneDNN (which the project's
    linear layers use, :mod:`opsdl_core.models.linear`). On an AMD CPU MKL's float32 runs at about half of oneDNN's,
    so a peak from ``torch.mm`` alone would set the limit at half the hardware's."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(2048, 2048, dtype=getattr(torch, dtype))
    b = torch.randn(2048, 2048, dtype=getattr(torch, dtype))
    products = [lambda: a @ b]
    if a.device.type == "cpu" and torch.backends.mkldnn.is_available():
        bt = b.t().contiguous()  # oneDNN's linear computes a @ wᵀ
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], ""))
    best = float("inf")
    for product in products:
        for _ in range(2):
            product()
        for _ in range(5):
            t = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - t)
    return 2 * 2048 ** 3 / best


def read_bandwidth(threads: int, mib: int = 512) -> float:
    """Bytes/s of reading a ``mib``-MiB float32 tensor from memory (its sum) on ``threads`` torch threads, best
    of 5: what a decode step, which reads every weight once, is bounded by."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(mib * 2**20 // 4)  # written, so really in memory (an untouched tensor reads zero pages)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best


def _shape(config) -> tuple[int, int, int, int]:
    """(hidden size, layers, query heads × head dim, key/value heads × head dim)."""
    h, heads = config.hidden_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    d = getattr(config, "head_dim", None) or h // heads
    return h, config.num_hidden_layers, heads * d, kv * d


def layer_weights(config) -> int:
    """Matmul weights of one decoder layer: q, k, v, o and the three MLP projections."""
    h, _, q, kv = _shape(config)
    return 2 * h * q + 2 * h * kv + 3 * h * config.intermediate_size


def weight_bytes(config, dtype_bytes: int = 4) -> float:
    """The weights a forward step reads: every layer's matmul weights and the LM head (norms are negligible)."""
    return dtype_bytes * (config.num_hidden_layers * layer_weights(config) + config.hidden_size * config.vocab_size)


def attention_flops(config, new_tokens: int, context: int) -> float:
    """Forward FLOPs of the attention products (``QKᵀ`` and ``PV``) of ``new_tokens`` tokens over ``context``
    cached tokens and, causally, over each other, in every layer."""
    _, L, q, _ = _shape(config)
    return 2 * 2 * L * q * new_tokens * (context + new_tokens / 2)


def attention_rate(config, tokens: int, threads: int, *, backward: bool = False) -> float:
    """FLOP/s of PyTorch's fused causal attention (``scaled_dot_product_attention``, ``is_causal``, GQA) over a
    ``tokens``-token prompt of ``config``'s heads in float32 on ``threads`` threads, best of 5: forward only, or
    forward and backward counted as 3x the forward's FLOPs (the backward's four products for dQ, dK, dV and dP;
    the flash kernel recomputes the scores too, which is not counted). The attention's share of a limit is
    bounded by this rate, not by the matmul peak: on the CPUs measured the kernel runs at a fraction of it."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    _, _, q, kv = _shape(config)
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    qt = torch.randn(1, q // d, tokens, d, requires_grad=backward)
    kt = torch.randn(1, kv // d, tokens, d, requires_grad=backward)
    vt = torch.randn(1, kv // d, tokens, d, requires_grad=backward)

    def run():
        qt.grad = kt.grad = vt.grad = None
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        if backward:
            out.sum().backward()

    best = float("inf")
    for i in range(7):
        t = time.perf_counter()
        run()
        if i >= 2:
            best = min(best, time.perf_counter() - t)
    per_layer = attention_flops(config, tokens, 0) / config.num_hidden_layers
    return per_layer * (3 if backward else 1) / best


def forward_flops(config, new_tokens: int, context: int, *, head_tokens: int | None = None) -> float:
    """Forward FLOPs of ``new_tokens`` tokens run on top of ``context`` cached tokens: 2 * (matmul weights)
    per token in the layers, causal attention to the context and among themselves, and the LM head at
    ``head_tokens`` positions (default: every new token)."""
    h, L, q, _ = _shape(config)
    attn = attention_flops(config, new_tokens, context)
    head = 2 * h * config.vocab_size * (new_tokens if head_tokens is None else head_tokens)
    return 2 * L * layer_weights(config) * new_tokens + attn + head


def question_flops(config, prompt_len: int, new_tokens: float) -> float:
    """One greedy answer: the prompt prefilled (the head at its last position), then ``new_tokens`` decoded."""
    return forward_flops(config, prompt_len, 0, head_tokens=1) + forward_flops(config, int(round(new_tokens)), prompt_len)


def distill_step_flops(config, *, long_prompt: int, short_prompt: int, samples: int, response: float,
                       shared_prefill: bool = True) -> float:
    """One on-policy step as opsdl computes it: the rollout (``samples`` answers decoded; with
    ``shared_prefill`` it decodes from the student's own prefill, otherwise it encodes the prompt itself), the
    teacher on the short prompt, the student on the long one (prompt encoded once, answers on top), and the
    student's backward (~1x its forward for activations; the LoRA weight gradients are negligible)."""
    r = int(round(response))
    rollout = samples * forward_flops(config, r, long_prompt)
    if not shared_prefill:
        rollout += forward_flops(config, long_prompt, 0, head_tokens=1)
    teacher = forward_flops(config, short_prompt, 0, head_tokens=1) + samples * forward_flops(config, r, short_prompt)
    student = forward_flops(config, long_prompt, 0, head_tokens=1) + samples * forward_flops(config, r, long_prompt)
    return rollout + teacher + 2 * student


def step_limit_s(config, *, flops: float, response: float, peak: float, bandwidth: float) -> float:
    """The step's FLOP-and-bandwidth limit: its FLOPs at the matmul peak plus the decode's weight reads (one
    read of every weight per decoded token after the first, the samples of a step decoding together) at the
    read bandwidth."""
    return flops / peak + max(0.0, response - 1) * weight_bytes(config) / bandwidth
