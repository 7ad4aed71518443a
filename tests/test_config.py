"""Typed configs: YAML round trip, clear errors naming the field, a stable result-affecting hash."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsdl_core.config import ConfigError, RunConfig
from opsdl_core.config_schema import parse_overrides

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
    ({"rollout": {"decode_threads": -1}}, "rollout.decode_threads: expected an integer >= 0"),
    ({"rollout": {"decode_threads": 1.5}}, "rollout.decode_threads: expected an integer"),
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


def test_the_hash_has_one_rule_every_field_but_the_marked_ones():
    """Changing any field changes the hash unless the field is declared hashed=False (where a run writes,
    threads, logging and saving cadence, engine memory), whatever the other fields say."""
    import dataclasses

    import opsdl_core.config as config

    base = RunConfig(rollout=config.RolloutConfig(backend="transformers"))
    unhashed, hashed = [], []
    for section in dataclasses.fields(RunConfig):
        sub = getattr(base, section.name)
        subs = [(section.name, sub)] + [(f"{section.name}.{f.name}", getattr(sub, f.name))
                                        for f in dataclasses.fields(sub) if dataclasses.is_dataclass(getattr(sub, f.name))]
        for where, obj in subs:
            for f in dataclasses.fields(obj):
                (hashed if f.metadata.get("hash", True) else unhashed).append(f"{where}.{f.name}")
    assert {"train.run_dir", "train.num_threads", "model.cache_dir", "rollout.vllm.kv_cache_gib"} <= set(unhashed)
    assert {"optim.lr", "train.steps", "rollout.vllm.enforce_eager", "loss.control_advantage"} <= set(hashed)
    changed = {"train.run_dir": "x", "train.num_threads": 3, "train.save_every": 7, "train.keep_checkpoints": 5,
               "train.log_every": 4, "train.max_nonfinite_steps": 5, "train.gradient_checkpointing": True, "model.cache_dir": "/c", "eval.batch_size": 2,
               "eval.before": False,
               "rollout.vllm.kv_cache_gib": 3.0, "rollout.vllm.cpu_threads": 1, "rollout.vllm.in_process": True,
               "rollout.vllm.max_model_len": 8192, "rollout.vllm.model_dir": "/m",
               "rollout.vllm.gpu_memory_utilization": 0.5, "rollout.vllm.max_num_batched_tokens": 16384,
               "rollout.vllm.sleep": True, "rollout.decode_threads": 0, "rollout.vllm.sync": "lora"}
    assert set(changed) == set(unhashed)
    for key, value in changed.items():
        assert RunConfig.from_dict(parse_overrides([f"{key}={value}"])).hash() == RunConfig().hash(), key
    for key, value in {"rollout.vllm.enforce_eager": False, "loss.control_advantage": 2.0, "train.seed": 1,
                       "data.short_budget_tokens": 64, "method.beta": 0.2}.items():
        assert RunConfig.from_dict(parse_overrides([f"{key}={value}"])).hash() != RunConfig().hash(), key
    assert config.HASH_SCHEMA >= 2


def test_overrides_parse_as_yaml_scalars():
    o = parse_overrides(["train.steps=7", "loss.advantage_clip=2.5", "lora.enabled=false", "model.name=a/b"])
    cfg = RunConfig.from_dict({}, o)
    assert (cfg.train.steps, cfg.loss.advantage_clip, cfg.lora.enabled, cfg.model.name) == (7, 2.5, False, "a/b")
    with pytest.raises(ConfigError, match="SECTION.FIELD=VALUE"):
        parse_overrides(["train.steps"])


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        RunConfig.from_yaml(tmp_path / "nope.yaml")


def test_every_field_has_help_and_the_reference_page_is_generated_from_it():
    import dataclasses

    import opsdl_core.config_reference as reference

    def fields(cls, prefix=""):
        for f in dataclasses.fields(cls):
            sub = reference.section_types(cls).get(f.name)
            if prefix or sub is None:  # RunConfig's sections are described by their classes' docstrings
                yield prefix + f.name, f
            if sub is not None:
                yield from fields(sub, f"{prefix}{f.name}.")

    found = list(fields(RunConfig))
    assert len(found) > 80
    missing = [p for p, f in found if len(f.metadata.get("help", "")) < 10]
    assert missing == []
    assert reference.field_help("optim.lr").startswith("AdamW learning rate")
    assert reference.field_default("optim.lr") == RunConfig().optim.lr == 1e-4
    with pytest.raises(KeyError, match="optim.nope"):
        reference.field_help("optim.nope")
    page = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert page == reference.reference_markdown(), "docs/configuration.md is stale: opsdl config reference > it"
    assert "| `rollout.vllm.kv_cache_gib` |" in page and "*Not hashed.*" in page
