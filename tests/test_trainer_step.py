"""One training step's arithmetic and its records: the token-level mean over gradient accumulation,
the teacher in eval mode, and ``opsdl train`` ending with its run and scores in the lineage store."""

from __future__ import annotations

import json

import pytest
import torch
from test_trainer import tiny_cfg  # noqa: E402  (tests/ is on sys.path)

from opsdl_core.data.prepare import prepare_data, prompt_order
from opsdl_core.models.tiny import build_tiny_model
from opsdl_core.train.recipe import OPSDLTrainer


class _ReplayRollout:
    """A sampler that answers each prompt with fixed token ids (lengths differ by prompt), whatever the
    seed: the same samples however the prompts are split into micro-batches."""

    weight_version = 0

    def __init__(self, answers):
        self.answers = answers  # prompt (tuple of ids) -> list of responses

    def generate(self, prompts, *, n, params, seed):
        from opsdl_core.models.rollout import RolloutBatch

        idx, resp = [], []
        for i, p in enumerate(prompts):
            for r in self.answers.get(tuple(p), [[5, 6, 7]] * n)[:n]:  # others: e.g. the baselines' targets
                idx.append(i)
                resp.append(list(r))
        return RolloutBatch(prompt_index=idx, response_ids=resp, sampler_logprobs=[[0.0] * len(r) for r in resp],
                            finish_reasons=["length"] * len(resp))

    def update_weights(self, version, state_dict=None):
        self.weight_version = version

    def release(self):
        pass


@pytest.mark.parametrize("method", ["opsdl", "sft"])
def test_grad_accum_gives_the_gradient_of_one_micro_batch_holding_both(tmp_path, method):
    """The loss is the token-level mean over the whole step: two micro-batches of one prompt each
    (answers of 2 and 7 tokens) give the gradient of one micro-batch holding both prompts (not the
    mean of the two micro-batches' means)."""
    grads = {}
    for name, train in (("accum", {"grad_accum": 2, "prompts_per_step": 1}),
                        ("one", {"grad_accum": 1, "prompts_per_step": 2})):
        cfg = tiny_cfg(tmp_path / name, loss={"kind": "reverse_kl"}, rollout={"max_logprob_diff": None},
                       optim={"max_grad_norm": None}, method={"kind": method},
                       train={**train, "teacher": "base", "steps": 1})
        model, tok = build_tiny_model(seed=0)
        data = prepare_data(cfg.data, tok)
        order = [data.train[prompt_order(len(data.train), cfg.train.seed, c)] for c in (0, 1)]
        lens = (2, 7)
        replay = _ReplayRollout({tuple(p.student_ids): [[5 + j] * (lens[order.index(p)] if p in order else 3)
                                                        for j in range(2)] for p in data.train})
        tr = OPSDLTrainer(cfg, model, tok, data, rollout=replay, log=lambda s: None)
        tr.setup()
        steps_prompts = [tr.data.train[i] for m in range(cfg.train.grad_accum) for i in tr._batch_indices(m)]
        assert steps_prompts == order  # both runs train on the same two prompts in this step
        if method == "sft":  # targets of different lengths too
            for k, p in enumerate(order):
                i = tr.data.train.index(p)
                tr.baseline[i]["target_ids"] = [5] * lens[k]
        seen = []
        step = tr.optimizer.step

        def spy(*a, **kw):  # called every micro-batch; the accelerated optimizer steps at the last one
            if tr.accelerator.sync_gradients:
                seen.append({n: q.grad.detach().clone() for n, q in tr.unwrapped.named_parameters()
                             if q.requires_grad and q.grad is not None})
            return step(*a, **kw)

        tr.optimizer.step = spy
        tr.train_step()
        grads[name] = seen[-1]
        assert [p.example.id for p in order] and len(seen) == 1
    assert grads["accum"].keys() == grads["one"].keys() and grads["one"]
    for n in grads["one"]:
        torch.testing.assert_close(grads["accum"][n], grads["one"][n], rtol=1e-4, atol=1e-7, msg=n)


def test_the_teacher_scores_in_eval_mode_and_the_student_trains_in_train_mode():
    """Dropout off for the teacher's log-probs (a target, not a sample); the student's mode restored."""
    from opsdl_core.train.teacher import TeacherWeights

    model, _ = build_tiny_model(seed=0)
    model.config.attention_dropout = 0.0
    drop = torch.nn.Dropout(0.5)
    model.model.norm.register_forward_hook(lambda m, i, o: drop(o))  # a dropout layer inside the network
    model.add_module("extra_dropout", drop)
    model.train()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    teacher = TeacherWeights(model, "live", lora=False)
    with teacher.scoring():
        assert not any(m.training for m in model.modules())
        a, b = model(ids).logits, model(ids).logits
    torch.testing.assert_close(a, b)
    assert all(m.training for m in model.modules())
    assert not torch.allclose(model(ids).logits, model(ids).logits)  # in train mode the dropout is on


def test_opsdl_train_ends_with_its_run_and_scores_in_the_lineage_store(tmp_path, tiny_model_dir, capsys):
    """`python -m opsdl_core.train` (= `opsdl train`) records the run, its checkpoints and its held-out
    scores before and after, with every answer, in DuckDB; --no-lineage leaves the store alone."""
    import yaml

    from opsdl_core.lineage.store import LineageStore
    from opsdl_core.run_dir import RunDir
    from opsdl_core.train.job import main

    cfg = tiny_cfg(tmp_path / "run", model={"name": str(tiny_model_dir)}, train={"steps": 2, "num_threads": 1})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    db = tmp_path / "lineage.duckdb"
    assert main(["--config", str(path), "--db", str(db), "--experiment", "mine"]) == 0
    assert "lineage: run train-" in capsys.readouterr().out
    store = LineageStore(db)
    _, runs = store.query("SELECT run_id, status FROM runs WHERE kind = 'train'")
    assert len(runs) == 1 and runs[0][1] == "finished"
    results = json.loads(RunDir(tmp_path / "run").results.read_text())
    _, scores = store.query("SELECT c.kind, s.task, s.context, s.value, s.n FROM eval_scores s "
                            "JOIN checkpoints c USING (checkpoint_id) ORDER BY ALL")
    after = {(t, c): v for k, t, c, v, n in scores if k == "merged"}
    assert after[("heldout", "long")] == pytest.approx(results["after_long_accuracy"])
    assert after[("heldout", "short")] == pytest.approx(results["after_short_accuracy"])
    _, before = store.query("SELECT value FROM eval_scores WHERE checkpoint_id LIKE 'base:%' AND context = 'long'")
    assert before[0][0] == pytest.approx(results["before_long_accuracy"])
    _, answers = store.query("SELECT count(*) FROM eval_answers")
    assert answers[0][0] == 2 * 2 * cfg.data.heldout_size  # long and short, before and after
    other = tmp_path / "other.duckdb"
    assert main(["--config", str(path), "--db", str(other), "--no-lineage"]) == 0
    assert not other.exists()


@pytest.mark.parametrize("merged_sampler", [True, False])
def test_shared_prefill_trains_as_encoding_the_prompt_twice(tmp_path, monkeypatch, merged_sampler):
    """``rollout.shared_prefill``: the student encodes its long prompts once per step, with gradient; the
    rollout decodes from that prefill (it is really used: the decode-cache builder is called once per step)
    and the student's scoring runs on it. Two steps give the samples, metrics and weights of the run that
    encodes the prompt again for sampling (to float tolerance)."""
    from test_trainer import make_trainer, trainable

    import opsdl_core.models.rollout as rollout_mod

    calls = []
    real = rollout_mod.decode_cache
    monkeypatch.setattr(rollout_mod, "decode_cache", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = {}
    for shared in (True, False):
        cfg = tiny_cfg(tmp_path / str(shared), rollout={"shared_prefill": shared, "merged_sampler": merged_sampler},
                       train={"steps": 2, "teacher": "base"})
        tr = make_trainer(cfg).setup(resume=False)
        assert tr._shared_prefill is shared
        ms = [tr.train_step() for _ in range(2)]
        runs[shared] = ms, trainable(tr)
    assert len(calls) == 2
    (ms_s, w_s), (ms_t, w_t) = runs[True], runs[False]
    for a, b in zip(ms_s, ms_t):
        for key in ("loss", "kl_estimate", "response_len", "sampler_logprob_absdiff", "tokens"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    for n in w_t:
        torch.testing.assert_close(w_s[n], w_t[n], atol=1e-6, rtol=1e-5, msg=n)


def test_shared_prefill_is_off_where_it_would_not_be_exact(tmp_path):
    """Gradient accumulation (every micro-batch is sampled before any backward), dropout and the vLLM
    backend fall back to encoding the prompt twice (so does mixed precision: accelerate's state is one per
    process, so it is not switched here)."""
    from test_trainer import make_trainer

    for name, sections in (("accum", {"train": {"grad_accum": 2}}), ("dropout", {"lora": {"dropout": 0.1}})):
        tr = make_trainer(tiny_cfg(tmp_path / name, **sections)).setup(resume=False)
        assert tr._shared_prefill is False, name
    tr = make_trainer(tiny_cfg(tmp_path / "default")).setup(resume=False)
    assert tr._shared_prefill is True


def test_fused_lora_forward_is_peft_s_forward(tmp_path):
    """The fused LoRA forward (adapter added inside the second matmul) gives PEFT's outputs and gradients
    for every adapted layer, with non-zero B (after a step), and with the adapter disabled (the base teacher)
    gives the base model's outputs; PEFT's own forward stays behind it for every other case."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from opsdl_core.config import RunConfig
    from opsdl_core.train.lora import apply_lora

    model, _ = build_tiny_model(seed=0)
    base_out = model(input_ids=torch.tensor([[3, 4, 5, 6, 7, 8]])).logits.detach()
    peft_model = apply_lora(model, RunConfig.from_dict({"lora": {"r": 4, "alpha": 8}}))
    layers = [m for m in peft_model.modules() if type(m) is LoraLinear]
    assert layers and all("forward" in vars(m) for m in layers)  # every adapted layer got the fused forward
    torch.manual_seed(1)
    for m in layers:  # a trained adapter: B is zero at initialisation
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.2)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])

    def run(fused: bool):
        for m in layers:
            if not fused:
                vars(m)["_saved"] = vars(m).pop("forward")
            elif "_saved" in vars(m):
                m.forward = vars(m).pop("_saved")
        peft_model.zero_grad()
        out = peft_model(input_ids=ids).logits
        (out.float().pow(2).mean()).backward()
        return out.detach(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    plain, g_plain = run(fused=False)
    fused, g_fused = run(fused=True)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    for n in g_plain:
        torch.testing.assert_close(g_fused[n], g_plain[n], atol=1e-6, rtol=1e-4, msg=n)
    assert not torch.allclose(fused[:1], base_out, atol=1e-3)  # the adapter really contributes
    with torch.no_grad(), peft_model.disable_adapter():
        torch.testing.assert_close(peft_model(input_ids=ids[:1]).logits, base_out, atol=1e-6, rtol=1e-6)


def test_merging_lora_into_the_sampler_equals_the_merged_state_dict():
    """The merged sampler's sync writes W + s·B·A straight into the sampler's weights: the values of
    ``merged_lora_weights`` for every adapted weight (a trained adapter), the other weights untouched."""
    import copy

    from opsdl_core.config import RunConfig
    from opsdl_core.models.rollout import merge_lora_into, merged_lora_weights
    from opsdl_core.train.lora import apply_lora

    model, _ = build_tiny_model(seed=0)
    sampler = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in sampler.named_parameters()}
    peft_model = apply_lora(model, RunConfig.from_dict({"lora": {"r": 4, "alpha": 8}}))
    torch.manual_seed(2)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    want = merged_lora_weights(peft_model)
    assert merge_lora_into(peft_model, sampler) == len(want) > 0
    for n, p in sampler.named_parameters():
        if n in want:
            torch.testing.assert_close(p, want[n], atol=1e-6, rtol=1e-6, msg=n)
            assert not torch.allclose(p, before[n])
        else:
            assert torch.equal(p, before[n]), n
