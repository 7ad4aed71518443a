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
import shutil
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


# FSDP2 on two CPU processes: full sharding, the decoder layers as units (configs/accelerate/fsdp.yaml's kind),
# launched through tests/fsdp_cpu_train.py, which lifts accelerate's FSDP-on-accelerators-only gate
FSDP_CPU2 = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
mixed_precision: 'no'
num_machines: 1
num_processes: 2
machine_rank: 0
main_process_port: 29519
rdzv_backend: static
same_network: true
use_cpu: false
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
  fsdp_state_dict_type: FULL_STATE_DICT
"""


def _train(cfg_path: Path, *launch: str, entry: tuple[str, ...] = ("-m", "opsdl_core.train")) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = ["--no-eval", "--no-lineage", "--config", str(cfg_path)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, *entry, *args] if launch else \
        [sys.executable, "-m", "opsdl_core.train", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _same_training(one: Path, two: Path) -> None:
    """The runs in ``one`` and ``two`` took the same steps (gradient norms, learning rates) to the same adapter."""
    m1, m2 = _metrics(one), _metrics(two)
    assert [m["step"] for m in m2] == [1, 2, 3], "each step once: one process wrote the metrics"
    assert m2[-1]["prompts_seen"] == m1[-1]["prompts_seen"] == 6  # 2 ranks x 1 prompt x 3 steps
    # the same gradient at every step (the global norm, after the ranks' reduction)
    for x, y in zip(m1, m2):
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4), (x["step"], x["grad_norm"], y["grad_norm"])
    # the schedule stepped once per optimizer step under two processes (not once per process)
    f = lr_lambda("linear", 1, STEPS)
    assert [m["lr"] for m in m2] == pytest.approx([LR * f(s) for s in (1, 2, 3)])
    assert [m["lr"] for m in m1] == pytest.approx([m["lr"] for m in m2])
    a = load_file(str(one / "final" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "final" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).abs()
    trained = torch.cat([a[k].flatten() for k in a if "lora_B" in k]).abs()  # lora_B starts at zero
    assert trained.mean() > 1e-3, "the adapters did not train"
    assert diff.mean() < 1e-3 * trained.mean(), (float(diff.mean()), float(trained.mean()))
    assert diff.max() < 0.1 * LR * STEPS, float(diff.max())


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["opsdl", "sft"])
def test_two_ddp_processes_train_as_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, method):
    one = _cfg(tmp_path, tiny_model_dir, "one", method, grad_accum=2, prompts_per_step=1)
    two = _cfg(tmp_path, tiny_model_dir, "two", method, grad_accum=1, prompts_per_step=1)
    _train(one)
    _train(two, "--config_file", str(ROOT / "configs/accelerate/cpu2.yaml"))
    _same_training(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
@pytest.mark.parametrize("method, checkpointed", [("opsdl", False), ("sft", False), ("opsdl", True)])
def test_two_fsdp_processes_train_as_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, method,
                                                                            checkpointed):
    """FSDP2 over gloo, every parameter sharded over the two ranks: the merged sampler is synced from gathered
    weights, the checkpoint holds the gathered weights, and the final folders are written from them; with
    ``train.gradient_checkpointing`` on both sides, the recomputed layers run on the gathered weights too."""
    ck = {"gradient_checkpointing": checkpointed}
    one = _cfg(tmp_path, tiny_model_dir, "one", method, grad_accum=2, prompts_per_step=1, save_every=1, **ck)
    two = _cfg(tmp_path, tiny_model_dir, "two", method, grad_accum=1, prompts_per_step=1, save_every=1, **ck)
    launch = tmp_path / "fsdp-cpu2.yaml"
    launch.write_text(FSDP_CPU2)
    fsdp = ("--config_file", str(launch))
    entry = (str(ROOT / "tests" / "fsdp_cpu_train.py"),)
    _train(one)
    out = _train(two, *fsdp, entry=entry)
    assert "2 process(es), FSDP" in out and "accelerate runs" not in out, out[-3000:]
    _same_training(tmp_path / "one", tmp_path / "two")
    whole = (("final/model", "model.safetensors"), (f"checkpoints/step-{STEPS:06d}", "trainable.safetensors"))
    for folder, name in whole:
        a, b = (load_file(str(tmp_path / run / folder / name)) for run in ("one", "two"))
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a), folder  # whole tensors
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 0.1 * LR * STEPS, folder
    # resumed under FSDP from the step before the last (weights and AdamW state written whole, loaded into
    # the shards): the last step again gives the same adapter
    adapter = tmp_path / "two" / "final" / "adapter" / "adapter_model.safetensors"
    first = load_file(str(adapter))
    shutil.rmtree(tmp_path / "two" / "checkpoints" / f"step-{STEPS:06d}")
    shutil.rmtree(tmp_path / "two" / "final")
    out = _train(two, *fsdp, entry=entry)
    assert f"step-{STEPS - 1:06d} (step {STEPS - 1})" in out, out[-3000:]
    again = load_file(str(adapter))
    assert max(float((first[k] - again[k]).abs().max()) for k in first) < 1e-6


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


def test_fsdp_activation_checkpointing_is_refused_and_the_shipped_launch_file_does_not_ask_for_it():
    """accelerate's FSDP activation checkpointing recomputes each decoder layer with torch's checkpoint, which
    appends the prompt's keys and values to the KV cache a second time in the backward (measured on two CPU
    processes: 'The size of tensor a (268) must match the size of tensor b (258)'): refused at setup."""
    from types import SimpleNamespace

    import yaml

    from opsdl_core.train.sharding import check_fsdp_plugin

    with pytest.raises(ValueError, match="fsdp_activation_checkpointing.*train.gradient_checkpointing: true"):
        check_fsdp_plugin(SimpleNamespace(activation_checkpointing=True))
    check_fsdp_plugin(SimpleNamespace(activation_checkpointing=False))
    check_fsdp_plugin(None)
    shipped = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text())
    assert shipped["distributed_type"] == "FSDP" and shipped["fsdp_config"]["fsdp_activation_checkpointing"] is False


@pytest.mark.slow
def test_an_fsdp_launch_with_fsdp_activation_checkpointing_stops_before_training(tmp_path, tiny_model_dir):
    two = _cfg(tmp_path, tiny_model_dir, "two", "opsdl", grad_accum=1, prompts_per_step=1)
    launch = tmp_path / "fsdp-cpu2-ac.yaml"
    launch.write_text(FSDP_CPU2 + "  fsdp_activation_checkpointing: true\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch),
                           str(ROOT / "tests" / "fsdp_cpu_train.py"), "--no-eval", "--no-lineage",
                           "--config", str(two)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert "fsdp_activation_checkpointing: true in the accelerate launch file" in proc.stdout + proc.stderr
    assert not (tmp_path / "two" / "metrics.jsonl").exists()
