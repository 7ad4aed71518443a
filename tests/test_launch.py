"""The training process under `accelerate launch`: the shipped configs, the Dagster resource's
launch command, and a real launch on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from assets.resources import OpsdlResource
from opsdl_core.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_resource_launch_command(tmp_path):
    plain = OpsdlResource(home=str(tmp_path)).train_command("pipelines.pipes_train")
    assert plain == [sys.executable, "-m", "pipelines.pipes_train"]
    cmd = OpsdlResource(home=str(tmp_path), accelerate_config="configs/accelerate/fsdp.yaml").train_command("m")
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[3:] == ["--config_file", str(ROOT / "configs/accelerate/fsdp.yaml"), "-m", "m"]
    with pytest.raises(FileNotFoundError, match="accelerate_config: no file at .*nope.yaml"):
        OpsdlResource(home=str(tmp_path), accelerate_config="configs/accelerate/nope.yaml").train_command("m")


@pytest.mark.parametrize("name, kind", [("fsdp", "FSDP"), ("zero3", "DEEPSPEED"), ("cpu1", "NO")])
def test_shipped_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert str(cfg.distributed_type).split(".")[-1] == kind
    if kind == "FSDP":
        # FSDP's own activation checkpointing breaks the KV cache the answers are scored on (the trainer refuses
        # it: tests/test_distributed.py); train.gradient_checkpointing is the one to use
        assert cfg.fsdp_config["fsdp_version"] == 2 and cfg.fsdp_config["fsdp_activation_checkpointing"] is False
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == 3


@pytest.mark.slow
def test_training_under_accelerate_launch(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    cfg = RunConfig.from_dict({
        "model": {"name": str(tiny_model_dir)},
        "data": {"train_size": 4, "heldout_size": 0, "context_tokens": 160, "short_budget_tokens": 64,
                 "n_distractors": [2, 3]},
        "rollout": {"samples_per_prompt": 2, "max_new_tokens": 6},
        "lora": {"r": 4, "alpha": 8},
        "train": {"run_dir": str(run_dir), "steps": 2, "save_every": 2},
    })
    cfg.to_yaml(tmp_path / "cfg.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "configs/accelerate/cpu1.yaml"), "-m", "opsdl_core.train", "--no-eval",
                           "--config", str(tmp_path / "cfg.yaml")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 2 and results["config_hash"] == cfg.hash()
