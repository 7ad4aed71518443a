"""One training step's arithmetic and its records: the token-level mean over gradient accumulation,
the teacher in eval mode, and ``opsdl train`` ending with its run and scores in the lineage store."""

from __future__ import annotations

import json

import pytest
import torch
from test_trainer import tiny_cfg  # noqa: E402  (tests/ is on sys.path)

from opsdl_core.data.prepare import prepare_data, prompt_order
from opsdl_core.models.tiny import build_tiny_model
from opsdl_core.train.trainer import OPSDLTrainer


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
    from opsdl_core.train.run import main

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
