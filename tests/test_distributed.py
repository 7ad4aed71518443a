"""The trainer under ``accelerate launch`` with two CPU processes (DDP over gloo) trains as one process
with the same global batch: the same prompts, the same samples, the token-level mean over the global
batch, the learning-rate schedule stepped once per optimizer step, and so the same weights.

One process runs the global batch as ``grad_accum=2`` micro-batches of one prompt; two processes run one
prompt each (``grad_accum=1``). The seeds of a micro-batch's samples follow its place in the global step
(micro-batch, then rank), so both runs sample the same answers, and the final adapters must agree to
float32 round-off: the two sum the same per-token gradients in another order, so the gradient norms agree
to ~1e-6 relative; AdamW divides each gradient by its running RMS, which turns that round-off into visible
differences on the few elements whose gradient is ~0 (about 1% of them here), so the weights are compared
by their mean difference against the size of the update, and by the largest against lr x steps.
Long-SFT's reference answers differ in length between the two ranks' prompts, which checks the token-level mean
over the global batch (a mean of the ranks' own means would weigh them otherwise).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opsdl_core.config import RunConfig
from opsdl_core.train.lora import lr_lambda

ROOT = Path(__file__).resolve().parents[1]
LR, STEPS = 5e-3, 3


def _cfg(tmp_path: Path, tiny_model_dir: Path, name: str, method: str, **train) -> Path:
    cfg = RunConfig.from_dict({
        "model": {"name": str(tiny_model_dir)},
        "data": {"train_size": 6, "heldout_size": 0, "context_tokens": 160, "short_budget_tokens": 64,
                 "n_distractors": [2, 3]},
        "rollout": {"samples_per_prompt": 2, "max_new_tokens": 6, "temperature": 1.0},
        "lora": {"r": 4, "alpha": 8},
        "optim": {"lr": LR, "schedule": "linear", "warmup_steps": 1},
        "method": {"kind": method, **({"target": "reference"} if method == "sft" else {})},
        "train": {"run_dir": str(tmp_path / name), "steps": STEPS, "save_every": STEPS, "seed": 7, "num_threads": 1,
                  **train},
    })
    path = tmp_path / f"{name}.yaml"
    cfg.to_yaml(path)
    return path


def _train(cfg_path: Path, *launch: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "-m", "opsdl_core.train", "--no-eval",
           "--no-lineage", "--config", str(cfg_path)] if launch else \
        [sys.executable, "-m", "opsdl_core.train", "--no-eval", "--no-lineage", "--config", str(cfg_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["opsdl", "sft"])
def test_two_ddp_processes_train_as_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, method):
    one = _cfg(tmp_path, tiny_model_dir, "one", method, grad_accum=2, prompts_per_step=1)
    two = _cfg(tmp_path, tiny_model_dir, "two", method, grad_accum=1, prompts_per_step=1)
    _train(one)
    _train(two, "--config_file", str(ROOT / "configs/accelerate/cpu2.yaml"))
    m1, m2 = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [m["step"] for m in m2] == [1, 2, 3], "each step once: one process wrote the metrics"
    assert m2[-1]["prompts_seen"] == m1[-1]["prompts_seen"] == 6  # 2 ranks x 1 prompt x 3 steps
    # the same gradient at every step (the global norm, after DDP's all-reduce)
    for x, y in zip(m1, m2):
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4), (x["step"], x["grad_norm"], y["grad_norm"])
    # the schedule stepped once per optimizer step under two processes (not once per process)
    f = lr_lambda("linear", 1, STEPS)
    assert [m["lr"] for m in m2] == pytest.approx([LR * f(s) for s in (1, 2, 3)])
    assert [m["lr"] for m in m1] == pytest.approx([m["lr"] for m in m2])
    a = load_file(str(tmp_path / "one" / "final" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).abs()
    trained = torch.cat([a[k].flatten() for k in a if "lora_B" in k]).abs()  # lora_B starts at zero
    assert trained.mean() > 1e-3, "the adapters did not train"
    assert diff.mean() < 1e-3 * trained.mean(), (float(diff.mean()), float(trained.mean()))
    assert diff.max() < 0.1 * LR * STEPS, float(diff.max())


@pytest.mark.parametrize("kind, lora, ok", [("ema", True, False), ("ema", False, False), ("base", False, False),
                                            ("base", True, True), ("live", True, True), ("live", False, True)])
def test_a_teacher_that_would_swap_into_sharded_weights_is_refused(kind, lora, ok):
    """Under FSDP / ZeRO-3 a tensor swapped into a module slot is not what the sharded layer gathers: the
    teacher would score with the student's weights, so those kinds are refused before any weight moves."""
    from opsdl_core.train.teacher import check_teacher_sharding

    for dist in ("NO", "MULTI_CPU", "MULTI_GPU", "DistributedType.MULTI_GPU"):
        check_teacher_sharding(kind, lora=lora, distributed_type=dist)  # one full copy per process: any kind
    for dist in ("FSDP", "DEEPSPEED", "DistributedType.FSDP"):
        if ok:
            check_teacher_sharding(kind, lora=lora, distributed_type=dist)
        else:
            with pytest.raises(ValueError, match=rf"train.teacher='{kind}' with lora.enabled={lora} under "
                                                 rf"(FSDP|DEEPSPEED).*score with the student's weights"):
                check_teacher_sharding(kind, lora=lora, distributed_type=dist)
