"""The FLOP counts the benchmarks' limits are built from (benchmarks/flops.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import flops  # noqa: E402

# SmolLM2-135M's shape: 30 layers, 9 query heads and 3 key/value heads of 64, MLP 1536, vocabulary 49152
SMOL = SimpleNamespace(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                       head_dim=64, intermediate_size=1536, vocab_size=49152)


def test_attention_flops_closed_form():
    # causal prompt of T tokens: QK^T and PV, 2 FLOPs per multiply-add, T^2/2 pairs, every layer and head
    T = 1076
    assert flops.attention_flops(SMOL, T, 0) == 2 * 2 * 30 * 576 * T * T / 2
    # T new tokens over C cached ones: C*T pairs plus T^2/2 among themselves
    assert flops.attention_flops(SMOL, 4, 1000) == 2 * 2 * 30 * 576 * 4 * (1000 + 2)


def test_forward_flops_is_matmuls_plus_attention_plus_head():
    T, C = 300, 700
    layers = 2 * 30 * flops.layer_weights(SMOL) * T
    head = 2 * 576 * 49152 * 1
    assert math.isclose(flops.forward_flops(SMOL, T, C, head_tokens=1),
                        layers + flops.attention_flops(SMOL, T, C) + head)
    # q, k, v, o and the MLP: 2*576*576 + 2*576*192 + 3*576*1536 per layer (~106M over 30 layers)
    assert flops.layer_weights(SMOL) == 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536


def test_attention_rate_runs_forward_and_backward():
    tiny = SimpleNamespace(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, intermediate_size=128, vocab_size=100)
    import torch

    threads = torch.get_num_threads()
    try:
        fwd = flops.attention_rate(tiny, 128, 1)
        both = flops.attention_rate(tiny, 128, 1, backward=True)
    finally:
        torch.set_num_threads(threads)  # it sets the process's thread count, as the benchmarks want
    assert math.isfinite(fwd) and fwd > 0
    assert math.isfinite(both) and both > 0
