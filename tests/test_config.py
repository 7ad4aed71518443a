"""Typed configs: YAML round trip, clear errors naming the field, a stable result-affecting hash."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsdl_core.config import ConfigError, RunConfig, parse_overrides

REPO = Path(__file__).resolve().parents[1]


def test_demo_config_loads_and_round_trips(tmp_path):
    cfg = RunConfig.from_yaml(REPO / "configs" / "demo.yaml")
    assert cfg.model.name == "smollm2-135m-instruct" and cfg.data.context_tokens >= 1024
    cfg.to_yaml(tmp_path / "c.yaml")
    again = RunConfig.from_yaml(tmp_path / "c.yaml")
    assert again == cfg and again.hash() == cfg.hash()


@pytest.mark.parametrize("data,message", [
    ({"train": {"stepz": 3}}, "train: unknown field(s) ['stepz']"),
    ({"loss": {"kind": "kl"}}, "loss.kind: expected one of"),
    ({"optim": {"lr": -1.0}}, "optim.lr: expected a float > 0"),
    ({"optim": {"lr": "fast"}}, "optim.lr: expected a number"),
    ({"train": {"steps": 2.5}}, "train.steps: expected an integer"),
    ({"train": {"teacher": "frozen"}}, "train.teacher: expected one of"),
    ({"data": {"n_distractors": [3]}}, "data.n_distractors: expected 2 values"),
    ({"data": {"n_distractors": [5, 2]}}, "data.n_distractors: expected [min, max]"),
    ({"lora": {"enabled": "yes"}}, "lora.enabled: expected true or false"),
    ({"loss": {"jsd_beta": 1.0}}, "loss.jsd_beta: expected a float in (0, 1)"),
    ({"rollout": {"temperature": 0}}, "rollout.temperature: expected a float > 0"),
    ({"bogus": {}}, "config: unknown field(s) ['bogus']"),
])
def test_bad_values_name_the_field(data, message):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(data)
    assert message in str(e.value)


def test_hash_tracks_result_affecting_fields_only():
    base = RunConfig()
    assert RunConfig.from_dict({"train": {"run_dir": "elsewhere", "num_threads": 1}}).hash() == base.hash()
    assert RunConfig.from_dict({"optim": {"lr": 2e-4}}).hash() != base.hash()
    assert RunConfig.from_dict({"loss": {"kind": "jsd"}}).hash() != base.hash()
    assert len(base.hash()) == 16 and base.hash() == RunConfig().hash()


def test_overrides_parse_as_yaml_scalars():
    o = parse_overrides(["train.steps=7", "loss.advantage_clip=2.5", "lora.enabled=false", "model.name=a/b"])
    cfg = RunConfig.from_dict({}, o)
    assert (cfg.train.steps, cfg.loss.advantage_clip, cfg.lora.enabled, cfg.model.name) == (7, 2.5, False, "a/b")
    with pytest.raises(ConfigError, match="SECTION.FIELD=VALUE"):
        parse_overrides(["train.steps"])


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        RunConfig.from_yaml(tmp_path / "nope.yaml")
