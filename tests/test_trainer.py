"""The on-policy loop on a tiny model: teacher kinds, exact ids, loss kinds, checkpoints, resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from opsdl_core.config import RunConfig
from opsdl_core.data.prepare import prepare_data
from opsdl_core.models.scoring import score_responses
from opsdl_core.models.tiny import build_tiny_model
from opsdl_core.run_dir import read_jsonl
from opsdl_core.train import recipe as trainer_mod
from opsdl_core.train.checkpoint import latest_checkpoint
from opsdl_core.train.job import run
from opsdl_core.train.recipe import OPSDLTrainer


def tiny_cfg(run_dir, **sections) -> RunConfig:
    base = {
        "model": {"name": "tiny"},
        "data": {"train_size": 6, "heldout_size": 3, "context_tokens": 160, "short_budget_tokens": 64,
                 "n_distractors": [2, 3]},
        "rollout": {"samples_per_prompt": 2, "max_new_tokens": 6},
        "lora": {"r": 4, "alpha": 8},
        "optim": {"lr": 5e-3},
        "train": {"run_dir": str(run_dir), "steps": 4, "save_every": 2, "seed": 3},
        "eval": {"max_new_tokens": 4, "batch_size": 4},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return RunConfig.from_dict(base)


def make_trainer(cfg, quiet=True):
    model, tok = build_tiny_model(seed=0)
    data = prepare_data(cfg.data, tok)
    return OPSDLTrainer(cfg, model, tok, data, log=(lambda s: None) if quiet else print)


def trainable(tr):
    return {n: p.detach().clone() for n, p in tr.unwrapped.named_parameters() if p.requires_grad}


def test_run_end_to_end_writes_results_checkpoints_and_final(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", data={"in_template_size": 2})
    lines = []
    res = run(cfg, model_and_tokenizer=build_tiny_model(seed=0), log=lines.append)
    assert res["steps"] == 4
    for k in ("before_long_accuracy", "after_long_accuracy", "before_short_accuracy", "after_short_accuracy",
              "before_in_template_long_accuracy", "after_in_template_long_accuracy"):
        assert 0.0 <= res[k] <= 1.0
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert math.isfinite(m["loss"]) and m["tokens"] > 0 and m["samples"] == 2
        assert all(m[k] >= 0 for k in ("generate_s", "teacher_s", "student_s", "optim_s", "step_s"))
        # transformers backend shares the trainer's weights: sampler and trainer agree
        assert m["sampler_logprob_absdiff"] < 1e-3
        assert 0.0 <= m["rollout_distractor_rate"] <= 1.0 - m["rollout_accuracy"]
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "checkpoints.jsonl")] == [2, 4]
    final = tmp_path / "run" / "final"
    assert (final / "adapter" / "adapter_config.json").is_file()
    assert (final / "model" / "config.json").is_file() and (final / "lineage.json").is_file()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config_hash"] == cfg.hash() and results["data_digest"]
    assert any("step 4/4" in line for line in lines)


def test_rollout_judgement_tells_a_distractor_from_an_invented_answer():
    from opsdl_core.data.examples import Example
    from opsdl_core.data.tasks.curriculum import generate_family
    from opsdl_core.grading import rollout_judgement

    ex = generate_family("event_date", n=1, split="train", target_tokens=300, count_tokens=lambda t: len(t.split()),
                         seed=0, n_distractors=(2, 3))[0]
    wrong = ex.metadata["distractor_answers"][0]
    texts = [f"It opens on {ex.answer}.", f"It opens on {wrong}.", "It opens on 2022-01-01.", "No idea."]
    assert rollout_judgement([ex] * 4, texts) == {"rollout_accuracy": 0.25, "rollout_distractor_rate": 0.25}
    bare = Example(id="b", long_context="x", short_context="x", question="q", answer=ex.answer)
    assert rollout_judgement([bare], [ex.answer]) == {"rollout_accuracy": 1.0}  # no distractors listed
    assert rollout_judgement([Example(id="n", long_context="x", short_context="x", question="q")], ["a"]) == {}


@pytest.fixture
def scoring_calls(monkeypatch):
    """Every score_responses call the trainer makes, by its keyword arguments, in order."""
    calls = []

    def spy(model, **kw):
        calls.append(kw)
        return score_responses(model, **kw)

    monkeypatch.setattr(trainer_mod, "score_responses", spy)
    return calls


def test_teacher_scores_exactly_the_students_token_ids(tmp_path, scoring_calls):
    calls = scoring_calls
    tr = make_trainer(tiny_cfg(tmp_path)).setup()
    rollouts = []
    real_generate = tr.rollout.generate
    tr.rollout.generate = lambda *a, **k: rollouts.append(real_generate(*a, **k)) or rollouts[-1]
    tr.train_step()
    teacher, student = calls
    assert teacher["responses"] == student["responses"] == rollouts[0].response_ids
    assert teacher["prompts"] != student["prompts"]  # x_S vs x_L
    assert all(len(s) > len(t) for s, t in zip(student["prompts"], teacher["prompts"]))


@pytest.mark.parametrize("kind", ["live", "base", "ema"])
def test_teacher_kinds(tmp_path, kind):
    cfg = tiny_cfg(tmp_path, train={"teacher": kind, "steps": 3}, optim={"lr": 5e-2})
    tr = make_trainer(cfg).setup()
    base_model, _ = build_tiny_model(seed=0)
    item = tr.data.train[0]
    resp = [[5, 6, 7, 8]]

    def teacher_lp():
        with tr.teacher.scoring():
            return score_responses(tr.unwrapped, prompts=[item.teacher_ids], responses=resp, prompt_index=[0],
                                   pad_id=tr.pad_id).logprobs

    def live_lp():
        with torch.no_grad():
            return score_responses(tr.unwrapped, prompts=[item.teacher_ids], responses=resp, prompt_index=[0],
                                   pad_id=tr.pad_id).logprobs

    with torch.no_grad():
        base_lp = score_responses(base_model, prompts=[item.teacher_ids], responses=resp, prompt_index=[0],
                                  pad_id=tr.pad_id).logprobs
    for _ in range(3):
        tr.train_step()
    before = trainable(tr)
    t, live = teacher_lp(), live_lp()
    assert not torch.allclose(live, base_lp, atol=1e-4), "training did not move the weights"
    if kind == "live":
        torch.testing.assert_close(t, live)
    elif kind == "base":
        torch.testing.assert_close(t, base_lp, atol=1e-5, rtol=1e-5)
    else:  # ema lies strictly between base and live
        assert not torch.allclose(t, live, atol=1e-5) and not torch.allclose(t, base_lp, atol=1e-5)
    after = trainable(tr)
    assert all(torch.equal(before[n], after[n]) for n in before), "scoring must restore the student weights"


def test_full_finetuning_with_frozen_base_teacher(tmp_path):
    cfg = tiny_cfg(tmp_path, lora={"enabled": False}, train={"teacher": "base", "steps": 2}, optim={"lr": 1e-2})
    tr = make_trainer(cfg).setup()
    n_all = sum(p.numel() for p in tr.unwrapped.parameters())
    assert sum(p.numel() for p in tr.unwrapped.parameters() if p.requires_grad) == n_all
    init = trainable(tr)
    tr.train_step()
    moved = trainable(tr)
    assert any(not torch.equal(init[n], moved[n]) for n in init)
    item, resp = tr.data.train[0], [[5, 6, 7, 8]]

    def lp(model):
        return score_responses(model, prompts=[item.teacher_ids], responses=resp, prompt_index=[0],
                               pad_id=tr.pad_id).logprobs

    with tr.teacher.scoring():
        assert all(torch.equal(p, init[n]) for n, p in tr.unwrapped.named_parameters())
        teacher = lp(tr.unwrapped)
    assert all(torch.equal(p, moved[n]) for n, p in tr.unwrapped.named_parameters())
    with torch.no_grad():  # the whole initial network, tied weights included, scores as the teacher
        torch.testing.assert_close(teacher, lp(build_tiny_model(seed=0)[0]), atol=1e-5, rtol=1e-5)


def test_ema_scoring_leaves_a_student_graph_built_before_it_usable(tmp_path):
    """The retention anchor scores with the teacher after the long-context term's forward pass:
    the teacher's weights must not be written into the student's (an in-place swap made this
    backward fail)."""
    tr = make_trainer(tiny_cfg(tmp_path, train={"teacher": "ema"}, optim={"lr": 5e-2})).setup()
    tr.train_step()  # the EMA now differs from the live weights
    item, resp = tr.data.train[0], [[5, 6, 7, 8]]
    student = score_responses(tr.unwrapped, prompts=[item.student_ids], responses=resp, prompt_index=[0],
                              pad_id=tr.pad_id).logprobs
    with tr.teacher.scoring():
        teacher = score_responses(tr.unwrapped, prompts=[item.student_ids], responses=resp, prompt_index=[0],
                                  pad_id=tr.pad_id).logprobs
    assert not torch.allclose(teacher, student.detach(), atol=1e-6)
    tr.unwrapped.zero_grad()
    student.sum().backward()
    grads = [p.grad for p in tr.unwrapped.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kind", ["pointwise", "reverse_kl", "forward_kl", "jsd", "topk_reverse_kl"])
def test_every_loss_kind_trains(tmp_path, kind):
    cfg = tiny_cfg(tmp_path, loss={"kind": kind, "topk": 5, "advantage_clip": 5.0, "is_ratio_clip": 2.0},
                   train={"teacher": "base"})
    tr = make_trainer(cfg).setup()
    init = trainable(tr)
    m = tr.train_step()
    assert math.isfinite(m["loss"]) and m["grad_norm"] > 0
    assert any(not torch.equal(init[n], p) for n, p in trainable(tr).items())


def _short_kl_to_base(tr, base_model):
    """Mean full-vocabulary KL(student || base) on every training item's short prompt, along one fixed response."""
    from opsdl_core.train.losses import reverse_kl_loss

    items = tr.data.train
    prompts = [p.teacher_ids for p in items]
    resp = [[5, 6, 7, 8, 9]] * len(items)
    kw = dict(prompts=prompts, responses=resp, prompt_index=list(range(len(items))), pad_id=tr.pad_id,
              return_logits=True)
    with torch.no_grad():
        s = score_responses(tr.unwrapped, **kw)
        b = score_responses(base_model, **kw)
    return float(reverse_kl_loss(student_logits=s.logits, teacher_logits=b.logits, mask=s.mask).loss)


def test_short_anchor_scores_the_short_prompt_and_holds_it_near_the_base(tmp_path, monkeypatch, scoring_calls):
    calls = scoring_calls
    cfg = tiny_cfg(tmp_path / "a", loss={"kind": "reverse_kl", "short_anchor": 1.0}, train={"teacher": "base"},
                   optim={"lr": 5e-2})
    tr = make_trainer(cfg).setup()
    item = tr.data.train[tr._batch_indices(0)[0]]
    m = tr.train_step()
    # long: teacher on x_S, student on x_L; anchor: teacher and student both on x_S, own samples
    (t_long, t_short, s_long, s_short) = calls  # the step's samples and teacher scores first, then the student
    assert s_long["prompts"] == [item.student_ids] and t_long["prompts"] == [item.teacher_ids]
    assert t_short["prompts"] == s_short["prompts"] == [item.teacher_ids]
    assert t_short["responses"] == s_short["responses"] != s_long["responses"]
    # before the first update the student IS the base on the short prompt: the anchor term is 0
    assert m["short_anchor_loss"] == pytest.approx(0.0, abs=1e-6)
    monkeypatch.setattr(trainer_mod, "score_responses", score_responses)
    for _ in range(5):  # the long-context term moves the weights, the short prompt drifts with them
        m = tr.train_step()
    assert m["short_anchor_loss"] > 0
    base_model, _ = build_tiny_model(seed=0)
    drifted = _short_kl_to_base(tr, base_model)
    student_loss = tr._student_loss

    def anchor_only(part, timings, control="none"):
        student_loss(part, timings, control)
        if part.student_prompts != [p.teacher_ids for p in part.batch]:  # the long-context term: weight 0
            part.loss.loss = part.loss.loss * 0.0

    monkeypatch.setattr(tr, "_student_loss", anchor_only)
    kls = [drifted]
    for _ in range(6):
        tr.train_step()
        kls.append(_short_kl_to_base(tr, base_model))
    # the anchor alone pulls the short-prompt distribution back towards the base, step after step
    # (AdamW at this learning rate may overshoot by a step: measured on an AVX-512 CPU, the sixth step rose 0.0223
    # -> 0.0226 after five falls)
    assert sum(b < a for a, b in zip(kls, kls[1:])) >= len(kls) - 2, kls
    assert kls[-1] < 0.95 * drifted, kls

def test_short_anchor_trains_with_an_ema_teacher(tmp_path):
    """The retention guard with an EMA teacher: the anchor's teacher pass comes after the long-context
    term's (autograd refused this step while the EMA was copied into the weights in place)."""
    cfg = tiny_cfg(tmp_path, loss={"kind": "forward_kl", "short_anchor": 1.0}, train={"teacher": "ema"},
                   optim={"lr": 5e-2})
    tr = make_trainer(cfg).setup()
    before = {n: p.detach().clone() for n, p in tr.unwrapped.named_parameters() if p.requires_grad}
    for _ in range(3):
        m = tr.train_step()
    assert math.isfinite(m["loss"]) and m["short_anchor_loss"] > 0
    assert any(not torch.equal(before[n], p) for n, p in tr.unwrapped.named_parameters() if p.requires_grad)


def test_short_anchor_needs_a_fixed_teacher(tmp_path):
    from opsdl_core.config import ConfigError

    with pytest.raises(ConfigError, match="loss.short_anchor.*teacher 'base' or 'ema'"):
        tiny_cfg(tmp_path, loss={"short_anchor": 0.5}, train={"teacher": "live"})
    with pytest.raises(ConfigError, match="loss.short_anchor"):
        tiny_cfg(tmp_path, loss={"short_anchor": -1.0}, train={"teacher": "base"})
    assert tiny_cfg(tmp_path, loss={"short_anchor": 0.0}).hash() == tiny_cfg(tmp_path).hash()
    assert tiny_cfg(tmp_path, loss={"short_anchor": 0.5}, train={"teacher": "base"}).hash() != \
        tiny_cfg(tmp_path, train={"teacher": "base"}).hash()


def test_grad_accum_and_prompt_batches(tmp_path):
    cfg = tiny_cfg(tmp_path, train={"grad_accum": 2, "prompts_per_step": 2, "steps": 1})
    tr = make_trainer(cfg).setup()
    seen = [[tr.data.train[j] for j in tr._batch_indices(i)] for i in range(2)]
    assert len({p.example.id for b in seen for p in b}) == 4  # a permutation: no prompt twice in an epoch
    init = trainable(tr)
    m = tr.train_step()
    assert m["samples"] == 2 * 2 * 2 and m["prompts_seen"] == 4 and tr.scheduler.get_last_lr()[0] > 0
    assert any(not torch.equal(init[n], p) for n, p in trainable(tr).items())  # stepped once, at the end


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    full = make_trainer(tiny_cfg(tmp_path / "a", train={"teacher": "ema"})).setup()
    full.train()
    part = make_trainer(tiny_cfg(tmp_path / "b", train={"teacher": "ema"})).setup()
    part.train(stop_after=3)  # checkpoint at 2; step 3 is lost with the "crash"
    assert latest_checkpoint(tmp_path / "b").name == "step-000002"
    resumed = make_trainer(tiny_cfg(tmp_path / "b", train={"teacher": "ema"})).setup()
    assert resumed.resumed_from == 2
    resumed.train()
    a, b = trainable(full), trainable(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.equal(full.teacher.shadow[n], resumed.teacher.shadow[n]) for n in full.teacher.shadow)
    ma = [m["loss"] for m in read_jsonl(tmp_path / "a" / "metrics.jsonl")]
    mb = [m["loss"] for m in read_jsonl(tmp_path / "b" / "metrics.jsonl")]
    assert ma == mb and len(ma) == 4


def test_resume_refuses_a_different_config(tmp_path):
    make_trainer(tiny_cfg(tmp_path, train={"steps": 2})).setup().train()
    with pytest.raises(RuntimeError, match="config"):
        make_trainer(tiny_cfg(tmp_path, train={"steps": 2}, optim={"lr": 1e-3})).setup()


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_weights(tmp_path, tiny_model_dir):
    """SIGKILL a real `python -m opsdl_core.train` after its first checkpoint, rerun, compare."""
    from safetensors.torch import load_file

    def cfg_file(run_dir):
        cfg = tiny_cfg(run_dir, model={"name": str(tiny_model_dir)}, train={"steps": 6, "save_every": 2})
        path = run_dir.parent / f"{run_dir.name}.yaml"
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(path)
        return path

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "opsdl_core.train", "--no-eval", "--config"]
    ref = tmp_path / "ref"
    subprocess.run(cmd + [str(cfg_file(ref))], check=True, env=env, capture_output=True, timeout=600)
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(cmd + [str(cfg_file(run_dir))], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = run_dir / "checkpoints.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not read_jsonl(log):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [r["step"] for r in read_jsonl(log)]
    assert done and done[-1] < 6, f"the process was not killed mid-run: {done}"
    subprocess.run(cmd + [str(cfg_file(run_dir))], check=True, env=env, capture_output=True, timeout=600)
    a = load_file(str(ref / "checkpoints" / "step-000006" / "trainable.safetensors"))
    b = load_file(str(run_dir / "checkpoints" / "step-000006" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sampler_weight_sync_and_stale_weights_stop_the_run(tmp_path, monkeypatch):
    auto = make_trainer(tiny_cfg(tmp_path / "auto")).setup()
    assert not auto._merged_sampler and auto.rollout.model is auto.unwrapped  # the default on a CPU: no copy
    cfg = tiny_cfg(tmp_path, optim={"lr": 5e-2}, train={"steps": 6},
                   rollout={"max_logprob_diff": 0.02, "merged_sampler": True})
    tr = make_trainer(cfg).setup()
    assert tr._merged_sampler and tr.rollout.model is not tr.unwrapped
    for _ in range(2):
        m = tr.train_step()
        assert m["sampler_logprob_absdiff"] < 1e-4 and m["weight_version"] == tr.step
    monkeypatch.setattr(tr, "sync_weights", lambda: None)  # a sync that silently does nothing
    with pytest.raises(RuntimeError, match="stale"):
        for _ in range(4):
            tr.train_step()


# a crafted pickle in a run folder, damaged checkpoints, kills at every phase: tests/test_resume_safety.py


# -- the controls (loss.control) ---------------------------------------------------------------
def test_control_long_prompt_teacher_reads_the_students_prompt_so_a_base_teacher_gives_no_signal(
        tmp_path, scoring_calls):
    cfg = tiny_cfg(tmp_path, loss={"control": "long_prompt"}, train={"teacher": "base"}, optim={"lr": 5e-2})
    tr = make_trainer(cfg).setup()
    before = trainable(tr)
    item = tr.data.train[tr._batch_indices(0)[0]]
    m = tr.train_step()
    teacher, student = scoring_calls
    assert teacher["prompts"] == student["prompts"] == [item.student_ids]
    # the adapter starts at zero, so the student IS the base teacher on the same prompt: no gap, no update
    assert m["kl_estimate"] == pytest.approx(0.0, abs=1e-6)
    assert all(torch.equal(before[n], p) for n, p in trainable(tr).items())
    method = make_trainer(tiny_cfg(tmp_path / "m", train={"teacher": "base"}, optim={"lr": 5e-2})).setup()
    m0 = trainable(method)
    method.train_step()  # the method itself, same everything: its teacher reads C_s and the weights move
    assert any(not torch.equal(m0[n], p) for n, p in trainable(method).items())


def test_control_other_context_teacher_reads_another_examples_short_context_with_this_question(
        tmp_path, scoring_calls):
    from opsdl_core.data.prepare import other_context_prompts

    cfg = tiny_cfg(tmp_path, loss={"control": "other_context"})
    tr = make_trainer(cfg).setup()
    items = tr.data.train
    wrong = other_context_prompts(items, tr.tokenizer)
    tok = tr.tokenizer
    for i, (p, ids) in enumerate(zip(items, wrong)):
        text = tok.decode(ids)
        assert p.example.question in text and p.teacher_context.text not in text
        others = [q.teacher_context.text for q in items if q.teacher_context.text != p.teacher_context.text]
        assert any(o in text for o in others), i
    assert other_context_prompts(items, tok) == wrong  # deterministic
    idx = tr._batch_indices(0)
    tr.train_step()
    assert scoring_calls[0]["prompts"] == [wrong[i] for i in idx] != [items[i].teacher_ids for i in idx]
    with pytest.raises(ValueError, match="two training examples with different"):
        other_context_prompts(items[:1], tok)


def test_control_constant_advantage_replaces_the_teacher_gap(tmp_path, monkeypatch):
    seen = []
    real = trainer_mod.compute_loss

    def spy(kind, **kw):
        seen.append(kw)
        return real(kind, **kw)

    monkeypatch.setattr(trainer_mod, "compute_loss", spy)
    cfg = tiny_cfg(tmp_path, loss={"control": "constant_advantage", "control_advantage": 0.5})
    tr = make_trainer(cfg).setup()
    m = tr.train_step()
    kw = seen[0]
    mask = kw["mask"].bool()
    adv = (kw["teacher_logprobs"] - kw["student_logprobs"].detach())[mask]
    assert torch.allclose(adv, torch.full_like(adv, -0.5))
    lp = kw["student_logprobs"].detach()[mask]
    assert m["loss"] == pytest.approx(float(0.5 * lp.mean()), rel=1e-4)  # -mean(A * lpS)
    assert m["kl_estimate"] != pytest.approx(0.5)  # the metrics keep the real teacher's gap


def test_controls_are_checked_at_config_time(tmp_path):
    from opsdl_core.config import ConfigError

    with pytest.raises(ConfigError, match="loss.control"):
        tiny_cfg(tmp_path, loss={"control": "constant_advantage", "kind": "forward_kl"})
    with pytest.raises(ConfigError, match="loss.control"):
        tiny_cfg(tmp_path, loss={"control": "long_prompt"}, method={"kind": "sft"})
    with pytest.raises(ConfigError, match="loss.control"):
        tiny_cfg(tmp_path, loss={"control": "no_teacher"})
    with pytest.raises(ConfigError, match="loss.control_advantage"):
        tiny_cfg(tmp_path, loss={"control": "constant_advantage", "control_advantage": 0})
    plain = tiny_cfg(tmp_path)
    assert tiny_cfg(tmp_path, loss={"control": "none"}).hash() == plain.hash()  # the default, spelled out
    hashes = {tiny_cfg(tmp_path, loss={"control": c}).hash() for c in ("long_prompt", "other_context",
                                                                         "constant_advantage")}
    assert len(hashes) == 3 and plain.hash() not in hashes
