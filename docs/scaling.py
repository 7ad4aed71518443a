"""The memory and compute arithmetic behind docs/scaling.md (prints its tables).

    python docs/scaling.py                 # all models, 32K/64K/128K, 8 GPUs of 80 GB
    python docs/scaling.py --gpu-gb 141    # H200

Shapes are Qwen2.5's 7B/14B/32B (grouped-query attention, bf16). Every figure is a formula of
the config below: bytes per parameter for weights/gradients/optimizer, the hidden states kept
by gradient checkpointing, the largest transient inside one recomputed layer, the LM head at the
answer positions only, and vLLM's KV cache per token.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Arch:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @property
    def params(self) -> float:
        attn = self.hidden * self.head_dim * (self.heads * 2 + self.kv_heads * 2)  # q, o, k, v
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp + 2 * self.hidden) + 2 * self.vocab * self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def linear_flops_per_token(self) -> float:
        return 2 * (self.params - 2 * self.vocab * self.hidden)  # matmuls of the layers (LM head apart)

    def attention_flops(self, tokens: int) -> float:
        # causal self-attention: QK^T and PV, 2 flops per multiply-add, half the square
        return 2 * 2 * self.layers * self.heads * self.head_dim * tokens * tokens / 2


MODELS = [
    Arch("7B", 28, 3584, 28, 4, 128, 18944, 152064),
    Arch("14B", 48, 5120, 40, 8, 128, 13824, 152064),
    Arch("32B", 64, 5120, 40, 8, 128, 27648, 152064),
]


def plan(a: Arch, tokens: int, *, gpus: int, gpu_gb: float, answer_tokens: int, samples: int,
         lora: bool, sp: int = 1) -> dict[str, float]:
    """Per-GPU memory (GB) of one training step on ``gpus`` GPUs with FSDP / ZeRO-3 full sharding
    and sequence parallelism ``sp`` (the context split over ``sp`` GPUs)."""
    p = a.params
    if lora:  # frozen bf16 base, sharded; the adapters and their optimizer are negligible (<1%)
        weights = 2 * p / gpus
        states = 0.0
    else:  # bf16 weights + bf16 grads + fp32 master + fp32 Adam m and v = 16 B/param, sharded
        weights = 2 * p / gpus
        states = 14 * p / gpus
    teacher = 0.0 if lora else 2 * p / gpus  # frozen-base teacher: LoRA disables its adapters instead
    t = tokens / sp + samples * answer_tokens
    ckpt_hidden = a.layers * t * a.hidden * 2  # one bf16 hidden state per layer (checkpointing)
    layer_peak = t * (3 * a.intermediate + 4 * a.hidden) * 2  # gate/up/act + attention projections, one layer
    head = samples * answer_tokens * a.vocab * 4 * 2  # float32 logits + grad, answer positions only
    full_head = tokens * a.vocab * 4  # what a full-sequence LM head would need (not done)
    total = weights + states + teacher + ckpt_hidden + layer_peak + head
    return {"weights": weights / GB, "grads+optim": states / GB, "teacher": teacher / GB,
            "activations": (ckpt_hidden + layer_peak) / GB, "lm_head": head / GB, "total": total / GB,
            "fits": total <= 0.9 * gpu_gb * GB, "full_head_gb": full_head / GB}


def min_sp(a: Arch, tokens: int, **kw) -> int:
    for sp in (1, 2, 4, 8):
        if plan(a, tokens, sp=sp, **kw)["fits"]:
            return sp
    return 0


def rollout(a: Arch, tokens: int, *, gpu_gb: float, answer_tokens: int, samples: int) -> dict[str, float]:
    """vLLM: weights per tensor-parallel group and the KV cache of one prompt with ``samples`` answers
    sharing its prefix (prefix caching / parallel sampling)."""
    kv_prompt = a.kv_bytes_per_token() * (tokens + samples * answer_tokens)
    w = 2 * a.params
    out = {}
    for tp in (1, 2, 4, 8):
        free = 0.9 * gpu_gb * GB * tp - w
        out[tp] = max(0.0, free / kv_prompt)  # concurrent prompts that fit
    flops = a.linear_flops_per_token() * tokens + a.attention_flops(tokens)
    return {"weights_gb": w / GB, "kv_gb_per_prompt": kv_prompt / GB, "prompts_by_tp": out, "prefill_pflop": flops / 1e15}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-gb", type=float, default=80.0)
    ap.add_argument("--answer-tokens", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=4)
    args = ap.parse_args()
    lengths = (32768, 65536, 131072)
    kw = dict(gpus=args.gpus, gpu_gb=args.gpu_gb, answer_tokens=args.answer_tokens, samples=args.samples)
    print(f"## Models (bf16)\n\n| model | params | weights | KV cache / token |\n|---|---:|---:|---:|")
    for a in MODELS:
        print(f"| {a.name} | {a.params / 1e9:.1f} B | {2 * a.params / GB:.1f} GB | {a.kv_bytes_per_token() / 1024:.0f} KiB |")
    for lora in (True, False):
        print(f"\n## Training step per GPU, {args.gpus} GPUs x {args.gpu_gb:.0f} GB, FSDP/ZeRO-3 full shard, "
              f"{'LoRA' if lora else 'full fine-tuning'}, gradient checkpointing, {args.samples} answers x "
              f"{args.answer_tokens} tokens\n")
        print("| model | context | weights | grads+optim | teacher | activations (SP=1) | LM head | total (SP=1) "
              "| SP needed | total at that SP |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for a in MODELS:
            for t in lengths:
                p = plan(a, t, lora=lora, **kw)
                sp = min_sp(a, t, lora=lora, **kw)
                q = plan(a, t, lora=lora, sp=sp, **kw) if sp else None
                tail = f"{sp} | {q['total']:.1f} |" if q else ">8 | — |"
                print(f"| {a.name} | {t // 1024}K | {p['weights']:.1f} | {p['grads+optim']:.1f} | {p['teacher']:.1f} | "
                      f"{p['activations']:.1f} | {p['lm_head']:.1f} | {p['total']:.1f} | {tail}")
    print(f"\n## Rollout (vLLM, bf16): concurrent prompts (each with {args.samples} answers) per engine\n")
    print("| model | context | weights | KV / prompt | TP=1 | TP=2 | TP=4 | TP=8 | prefill PFLOP / prompt |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for a in MODELS:
        for t in lengths:
            r = rollout(a, t, gpu_gb=args.gpu_gb, answer_tokens=args.answer_tokens, samples=args.samples)
            tps = " | ".join(f"{r['prompts_by_tp'][tp]:.1f}" for tp in (1, 2, 4, 8))
            print(f"| {a.name} | {t // 1024}K | {r['weights_gb']:.1f} | {r['kv_gb_per_prompt']:.1f} | {tps} | "
                  f"{r['prefill_pflop']:.2f} |")
    a = MODELS[0]
    print(f"\nA full-sequence LM head at 128K would need {plan(a, 131072, lora=True, **kw)['full_head_gb']:.0f} GB "
          f"of float32 logits for {a.name}; opsdl computes it at the answer positions only.")


if __name__ == "__main__":
    main()
