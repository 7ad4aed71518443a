"""Long-SFT and DPO (LongPO form) in the shared trainer: data from the initial weights, the
prompt tokens outside every loss, resume, and the same prompts as OPSDL."""

from __future__ import annotations

import math

import pytest
import torch
from test_trainer import make_trainer, tiny_cfg, trainable  # noqa: E402  (tests/ is on sys.path)

from opsdl_core.config import ConfigError, RunConfig
from opsdl_core.models.scoring import score_responses
from opsdl_core.run_dir import read_jsonl
from opsdl_core.train.baselines import used_prompt_indices


def test_method_section_validates_and_leaves_opsdl_hashes_alone(tmp_path):
    cfg = tiny_cfg(tmp_path)
    assert cfg.method.kind == "opsdl"
    d = cfg.to_dict()
    d.pop("method")
    assert RunConfig.from_dict(d).hash() == cfg.hash()  # a config written before baselines existed
    assert tiny_cfg(tmp_path, method={"kind": "dpo"}).hash() != cfg.hash()
    with pytest.raises(ConfigError, match="method.kind"):
        tiny_cfg(tmp_path, method={"kind": "ppo"})
    with pytest.raises(ConfigError, match="method.beta"):
        tiny_cfg(tmp_path, method={"kind": "dpo", "beta": 0})


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_baseline_trains_on_data_from_the_initial_weights(tmp_path, kind):
    cfg = tiny_cfg(tmp_path / kind, method={"kind": kind, "nll_weight": 0.5 if kind == "dpo" else 0.0})
    tr = make_trainer(cfg).setup()
    used = used_prompt_indices(cfg, len(tr.data.train))
    assert sorted(tr.baseline) == used and len(used) <= cfg.train.steps
    # the target is the initial model's greedy answer to the SHORT prompt; rejected (dpo) to the LONG one
    i = used[0]
    p = tr.data.train[i]
    from opsdl_core.models.rollout import SamplingParams

    greedy = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=cfg.rollout.max_new_tokens,
                            stop_token_ids=tr.sampling.stop_token_ids)
    assert tr.rollout.generate([p.teacher_ids], n=1, params=greedy, seed=0).response_ids[0] == \
        tr.baseline[i]["target_ids"]
    if kind == "dpo":
        assert tr.rollout.generate([p.student_ids], n=1, params=greedy, seed=0).response_ids[0] == \
            tr.baseline[i]["rejected_ids"]
        with torch.no_grad():  # the reference reads the short prompt
            ref = score_responses(tr.unwrapped, prompts=[p.teacher_ids], responses=[tr.baseline[i]["target_ids"]],
                                  prompt_index=[0], pad_id=tr.pad_id)
        assert float(ref.logprobs.sum()) == pytest.approx(tr.baseline[i]["ref_chosen"], abs=1e-4)
    init = trainable(tr)
    tr.train()
    metrics = read_jsonl(tmp_path / kind / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(math.isfinite(m["loss"]) for m in metrics)
    assert metrics[-1]["prompts_seen"] == 4 and all(m["generate_s"] == 0 for m in metrics)  # no rollouts
    if kind == "dpo":
        assert {"loss_reward_margin", "loss_reward_accuracy", "loss_nll"} <= set(metrics[0])
    assert any(not torch.equal(init[n], q) for n, q in trainable(tr).items())


def test_sft_loss_is_the_answer_tokens_cross_entropy_with_the_prompt_masked(tmp_path):
    """The trainer's SFT loss on one prompt equals transformers' own causal-LM loss over
    prompt + answer with the prompt's labels set to -100."""
    from opsdl_core.train.baseline_losses import response_labels, sft_loss

    cfg = tiny_cfg(tmp_path, method={"kind": "sft"})
    tr = make_trainer(cfg).setup()
    i = used_prompt_indices(cfg, len(tr.data.train))[0]
    p, target = tr.data.train[i], tr.baseline[i]["target_ids"]
    with torch.no_grad():
        out = score_responses(tr.unwrapped, prompts=[p.student_ids], responses=[target], prompt_index=[0],
                              pad_id=tr.pad_id)
        ours = sft_loss(target_logprobs=out.logprobs, mask=out.mask).loss
        ids = torch.tensor([list(p.student_ids) + list(target)])
        labels = torch.tensor([response_labels(len(p.student_ids), ids[0].tolist())])
        theirs = tr.unwrapped(input_ids=ids, labels=labels).loss
    assert int(out.mask.sum()) == len(target)
    assert float(ours) == pytest.approx(float(theirs), abs=1e-4)


def test_resumed_baseline_run_reuses_its_data_and_matches_an_uninterrupted_one(tmp_path):
    full = make_trainer(tiny_cfg(tmp_path / "a", method={"kind": "dpo"})).setup()
    full.train()
    part = make_trainer(tiny_cfg(tmp_path / "b", method={"kind": "dpo"})).setup()
    part.train(stop_after=3)
    resumed = make_trainer(tiny_cfg(tmp_path / "b", method={"kind": "dpo"})).setup()
    assert resumed.resumed_from == 2 and resumed.baseline == part.baseline  # read back, not rebuilt
    resumed.train()
    a, b = trainable(full), trainable(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [m["loss"] for m in read_jsonl(tmp_path / "a" / "metrics.jsonl")] == \
        [m["loss"] for m in read_jsonl(tmp_path / "b" / "metrics.jsonl")]


def test_baselines_and_opsdl_see_the_same_prompts(tmp_path):
    seen = {}
    for kind in ("opsdl", "sft", "dpo"):
        tr = make_trainer(tiny_cfg(tmp_path / kind, method={"kind": kind})).setup()
        seen[kind] = [tr._batch_indices(0)[0] for tr.step in range(4)]
    assert seen["opsdl"] == seen["sft"] == seen["dpo"]


def test_headless_run_of_a_baseline_writes_results_and_a_final_model(tmp_path):
    from opsdl_core.models.tiny import build_tiny_model
    from opsdl_core.train.job import run

    cfg = tiny_cfg(tmp_path / "run", method={"kind": "sft"})
    lines = []
    res = run(cfg, model_and_tokenizer=build_tiny_model(seed=0), log=lines.append)
    assert res["steps"] == 4 and 0.0 <= res["after_long_accuracy"] <= 1.0
    assert (tmp_path / "run" / "final" / "model" / "config.json").is_file()
    assert (tmp_path / "run" / "baseline_data.jsonl").is_file()
    assert any("sft data: " in line for line in lines) and any("step 4/4" in line for line in lines)
