"""The headline experiment: its config, the plan (same prompts per seed for every method), the
comparison's statistics, and a whole run on a tiny model with every score traceable in SQL."""

from __future__ import annotations

import json

import pytest

from opsdl_core.config import ConfigError
from opsdl_core.experiment.plan import load_experiment, plan_runs
from opsdl_core.experiment.report import summarize


def _write(tmp_path, experiment: dict, run: dict | None = None):
    import yaml

    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump({"experiment": {"out_dir": str(tmp_path / "out"), **experiment},
                                 "run": run or {"train": {"steps": 4}}}))
    return p


def test_config_names_the_bad_field(tmp_path):
    with pytest.raises(ConfigError, match="experiment.methods"):
        load_experiment(_write(tmp_path, {"methods": ["opsdl", "ppo"]}))
    with pytest.raises(ConfigError, match="experiment.seeds"):
        load_experiment(_write(tmp_path, {"seeds": [1, 1]}))
    with pytest.raises(ConfigError, match="unknown field"):
        load_experiment(_write(tmp_path, {"lenghts": [512]}))
    with pytest.raises(ConfigError, match="unknown section"):
        load_experiment(None, ["runs.train.steps=3"])
    with pytest.raises(ConfigError, match="train.steps"):
        load_experiment(_write(tmp_path, {}), ["run.train.steps=0"])
    for name in ("../../etc", "a/b", "..", ".hidden", "", "x" * 65, "a\\b", "a\0b", 7):  # each would leave its folder
        with pytest.raises(ConfigError, match="experiment.name"):
            load_experiment(_write(tmp_path, {"name": name}))


def test_plan_gives_every_method_of_a_seed_the_same_prompts_and_its_own_folder(tmp_path):
    exp = load_experiment(_write(tmp_path, {"seeds": [0, 5], "eval_every": 2}), ["run.train.steps=6"])
    runs = plan_runs(exp)
    assert [(r.seed, r.method) for r in runs] == [(s, m) for s in (0, 5) for m in ("opsdl", "sft", "dpo")]
    assert len({r.cfg.train.run_dir for r in runs}) == 6 and len({r.cfg.hash() for r in runs}) == 6
    for r in runs:
        assert r.cfg.method.kind == r.method and r.cfg.train.seed == r.seed
        assert r.cfg.data == exp.run.data  # the same training data for every run
        assert r.cfg.train.save_every == 2 and r.cfg.train.keep_checkpoints >= 4  # every intermediate point kept
    from opsdl_core.data.prepare import prompt_order

    orders = {(r.seed, r.method): [prompt_order(256, r.cfg.train.seed, i) for i in range(6)] for r in runs}
    assert orders[(0, "opsdl")] == orders[(0, "sft")] == orders[(0, "dpo")] != orders[(5, "opsdl")]


def test_variants_are_compared_like_methods_on_the_same_prompts(tmp_path):
    variants = {"topk100": {"loss": {"kind": "topk_reverse_kl", "topk": 100}},
                "lr3e-4": {"optim": {"lr": 3e-4}}, "ema": {"train": {"teacher": "ema"}},
                "wrong-cs": {"loss": {"control": "other_context"}}, "sft-hi": {"method": {"kind": "sft"},
                                                                              "optim": {"lr": 1e-3}}}
    exp = load_experiment(_write(tmp_path, {"methods": ["opsdl", *variants], "seeds": [0, 1], "variants": variants}))
    runs = plan_runs(exp)
    assert [r.label for r in runs[:6]] == ["opsdl-seed0", "topk100-seed0", "lr3e-4-seed0", "ema-seed0",
                                           "wrong-cs-seed0", "sft-hi-seed0"]
    by = {r.label: r.cfg for r in runs}
    assert by["topk100-seed0"].loss.kind == "topk_reverse_kl" and by["topk100-seed0"].loss.topk == 100
    assert by["lr3e-4-seed1"].optim.lr == 3e-4 and by["lr3e-4-seed1"].train.seed == 1
    assert by["ema-seed0"].train.teacher == "ema" and by["wrong-cs-seed0"].loss.control == "other_context"
    assert by["sft-hi-seed0"].method.kind == "sft" and by["topk100-seed0"].method.kind == "opsdl"
    assert all(c.data == exp.run.data and c.train.steps == exp.run.train.steps for c in by.values())
    assert len({c.train.run_dir for c in by.values()}) == len(by) == 12
    bad = [({"methods": ["opsdl", "nope"]}, "experiment.methods"),
           ({"methods": ["x"], "variants": {"x": {"data": {"train_size": 3}}}}, "experiment.variants.x"),
           ({"methods": ["x"], "variants": {"x": {"train": {"steps": 99}}}}, "experiment.variants.x"),
           ({"methods": ["sft"], "variants": {"sft": {}}}, "experiment.variants.sft"),
           ({"methods": ["a b"], "variants": {"a b": {}}}, "experiment.variants.a b")]
    for settings, where in bad:
        with pytest.raises(ConfigError, match=where):
            load_experiment(_write(tmp_path, settings))
    with pytest.raises(ConfigError, match="experiment.variants.x: .*loss.kind"):  # checked with the run config
        plan_runs(load_experiment(_write(tmp_path, {"methods": ["x"], "variants": {"x": {"loss": {"kind": "ppo"}}}})))


def test_summary_is_mean_and_spread_over_seeds_and_curves_start_at_the_base(tmp_path):
    exp = load_experiment(_write(tmp_path, {"methods": ["opsdl"], "seeds": [0, 1], "lengths": [512]}))

    def ev(method, seed, step, seen, acc, short):
        return {"params": {"method": method, "seed": seed, "step": step, "prompts_seen": seen},
                "rows": [{"task": "in_family", "context": "long", "context_length": 512, "value": acc},
                         {"task": "in_family", "context": "short", "context_length": 0, "value": short}]}

    evals = [ev("base", None, 0, 0, 0.4, 0.9), ev("opsdl", 0, 2, 2, 0.5, 0.9), ev("opsdl", 0, 4, 4, 0.6, 0.8),
             ev("opsdl", 1, 2, 2, 0.7, 0.9), ev("opsdl", 1, 4, 4, 0.8, 1.0)]
    trained = [{"method": "opsdl", "seed": s, "steps": 4, "prompts": 4, "train_seconds": t} for s, t in ((0, 10), (1, 20))]
    out = summarize(evals, trained, exp.settings)
    opsdl = next(r for r in out["table"] if r["method"] == "opsdl")
    assert opsdl["scores"]["in_family|long|512"]["mean"] == pytest.approx(0.7)  # final models only (step 4)
    assert opsdl["scores"]["in_family|long|512"]["sd"] == pytest.approx(0.1414, abs=1e-4)
    assert opsdl["scores"]["in_family|short|0"]["mean"] == pytest.approx(0.9)
    assert opsdl["prompts"] == 4 and opsdl["train_seconds"][0] == 15
    curve = out["curves"]["opsdl|in_family|512"]
    assert [(p["prompts_seen"], round(p["mean"], 3)) for p in curve] == [(0, 0.4), (2, 0.6), (4, 0.7)]
    assert [p["train_seconds"] for p in curve] == [0.0, None, None]  # no per-step times recorded


def test_sample_efficiency_at_equal_prompts_and_at_equal_wall_clock(tmp_path):
    from opsdl_core.experiment.report import comparison_markdown
    from opsdl_core.run_dir import RunDir

    rd = tmp_path / "run"
    rd.mkdir()
    # step 2 logged twice (the later record wins), a torn last line, and a record without a time
    (rd / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in (
        {"step": 1, "step_s": 3.0}, {"step": 2, "step_s": 9.0}, {"step": 2, "step_s": 4.0}, {"step": 3},
        {"step": 4, "step_s": 5.0})) + '{"step": 5, "st')
    assert RunDir(rd).seconds_at_step() == {1: 3.0, 2: 7.0, 4: 12.0}
    assert RunDir(tmp_path / "missing").seconds_at_step() == {}

    exp = load_experiment(_write(tmp_path, {"methods": ["opsdl", "sft"], "seeds": [0, 1], "lengths": [512]}))

    def ev(method, seed, step, acc):
        return {"params": {"method": method, "seed": seed, "step": step, "prompts_seen": step},
                "rows": [{"task": "in_family", "context": "long", "context_length": 512, "value": acc}]}

    evals = [ev("base", None, 0, 0.4)] + [ev("opsdl", s, st, a) for s in (0, 1) for st, a in ((2, 0.5), (4, 0.9))] \
        + [ev("sft", s, st, a) for s in (0, 1) for st, a in ((2, 0.6), (4, 0.7))]
    secs = {"opsdl": {2: 20.0, 4: 40.0}, "sft": {2: 5.0, 4: 10.0}}
    trained = [{"method": m, "seed": s, "steps": 4, "prompts": 4, "train_seconds": 50,
                "seconds_at_step": {k: v + s for k, v in secs[m].items()}} for m in secs for s in (0, 1)]
    out = summarize(evals, trained, exp.settings)
    assert [(p["prompts_seen"], p["train_seconds"]) for p in out["curves"]["opsdl|in_family|512"]] == \
        [(0, 0.0), (2, 20.5), (4, 40.5)]
    md = comparison_markdown(out)
    assert "| opsdl | 2 | 20 | 0.500 ± 0.000 |" in md and "| sft | 4 | 10 | 0.700 ± 0.000 |" in md
    # the fastest method's whole run took 10.5 s: OPSDL has no checkpoint by then but the base (0 prompts)
    assert "At equal wall-clock (10 s of training steps" in md
    assert "opsdl 0.400 (0 prompts); sft 0.700 ± 0.000 (4 prompts)" in md


@pytest.mark.slow
def test_whole_experiment_on_a_tiny_model_every_score_traceable(tmp_path, tiny_model_dir):
    from opsdl_core.lineage.store import LineageStore

    db = tmp_path / "lineage.duckdb"
    run = {"model": {"name": str(tiny_model_dir)},
           "data": {"train_size": 6, "context_tokens": 160, "short_budget_tokens": 64, "n_distractors": [2, 3],
                    "heldout_size": 0},
           "rollout": {"samples_per_prompt": 2, "max_new_tokens": 6}, "lora": {"r": 4, "alpha": 8},
           "optim": {"lr": 5e-3}, "train": {"steps": 2, "num_threads": 1}}
    cfg = _write(tmp_path, {"seeds": [0, 1], "lengths": [128, 192], "eval_n": 2, "eval_every": 1,
                            "max_new_tokens": 4, "db": str(db), "diagnostic_prompts": 2, "diagnostic_samples": 2,
                            "foreign_n": 0},
                 run)
    from opsdl_core.experiment.run import run_experiment

    logs: list[str] = []
    summary = run_experiment(load_experiment(cfg), log=logs.append)
    out = tmp_path / "out"
    md = (out / "comparison.md").read_text()
    for m in ("base", "opsdl", "sft", "dpo"):
        assert f"| {m} |" in md
    assert (out / "accuracy_vs_length.png").stat().st_size > 1000
    assert (out / "sample_efficiency.png").stat().st_size > 1000
    assert json.loads((out / "comparison.json").read_text())["seeds"] == [0, 1]
    assert (out / "gap_by_position.png").stat().st_size > 1000 and (out / "gap_heatmap.png").stat().st_size > 1000
    assert set(summary["gap_by_position"]) == {"base", "opsdl", "sft", "dpo"}
    assert len(summary["gap_examples"]["opsdl"]) == 2 * 2  # seed 0's answers only
    assert sum("training (2 steps)" in line for line in logs) == 6

    store = LineageStore(db)
    cols, rows = store.query("SELECT method, seed, step, prompts_seen, task, context, context_length, checkpoint_id, "
                             "eval_dataset, train_run_id, train_config_hash, train_datasets FROM v_method_scores")
    got = [dict(zip(cols, r)) for r in rows]
    # base and 6 final models: 2 families x 2 lengths + 2 C_s; 6 step-1 checkpoints: in-family at 192 only
    assert len(got) == 7 * 6 + 6
    assert {(g["task"], g["context_length"]) for g in got if g["step"] == 1} == {("in_family", 192)}
    suites = set(summary["suites"].values())
    for g in got:
        assert g["eval_dataset"] in suites
        if g["method"] == "base":
            assert g["checkpoint_id"].startswith("base:") and g["train_run_id"] is None
            continue
        assert g["train_run_id"] and g["train_datasets"], g  # checkpoint -> its training run -> its data
        _, p = store.query("SELECT key, value FROM params WHERE run_id = ? AND key IN ('method.kind', 'train.seed')",
                           [g["train_run_id"]])
        assert dict(p) == {"method.kind": g["method"], "train.seed": str(g["seed"])}
        _, ck = store.query("SELECT step, kind FROM checkpoints WHERE checkpoint_id = ?", [g["checkpoint_id"]])
        assert ck and ck[0][0] == g["step"] and ck[0][1] == ("merged" if g["step"] == 2 else "full-state")
    # the diagnostics: 2 prompts x 2 samples of the base and of the 6 final models, token by token
    cols, rows = store.query("SELECT r.run_id, count(*) FROM rollout_samples r GROUP BY r.run_id")
    assert len(rows) == 7 and all(n == 4 for _, n in rows)
    _, pos = store.query("SELECT count(DISTINCT run_id), min(position) FROM v_gap_by_position")
    assert pos[0] == (7, 0)
    # resuming re-uses every training and evaluation and writes the same rows
    logs.clear()
    run_experiment(load_experiment(cfg), log=logs.append)
    assert not any("training (" in line or "evaluating" in line for line in logs)
    assert store.count("eval_scores") == 7 * 6 + 6
    # a suite added later (the foreign-format retention suite) is evaluated alone on every final model
    logs.clear()
    before = json.loads((out / "evals" / "opsdl-seed0.json").read_text())["rows"]
    summary = run_experiment(load_experiment(cfg, ["experiment.foreign_n=7"]), log=logs.append)
    evaluating = [line for line in logs if "evaluating" in line]
    assert len(evaluating) == 7 and all(line.endswith("on foreign@0/short") for line in evaluating), evaluating
    assert not any("training (" in line for line in logs)
    after = json.loads((out / "evals" / "opsdl-seed0.json").read_text())["rows"]
    assert after[: len(before)] == before and [(r["task"], r["context"], r["n"]) for r in after[len(before):]] == [
        ("foreign", "short", 7)]
    _, rows = store.query("SELECT count(*) FROM v_method_scores WHERE task = 'foreign' AND context = 'short'")
    assert rows[0][0] == 7
    assert {r["method"] for r in summary["paired"] if r["tasks"] == "foreign"} == {"opsdl", "sft", "dpo"}


def test_committed_experiment_config_and_its_dagster_job():
    from pathlib import Path

    import dagster as dg

    from pipelines.definitions import build_definitions

    exp = load_experiment(Path(__file__).resolve().parents[1] / "configs" / "experiment.yaml")
    assert max(exp.settings.lengths) >= 1536 and len(exp.settings.seeds) == 3
    assert set(exp.settings.methods) == {"opsdl", "sft", "dpo"} and len(plan_runs(exp)) == 9
    defs = build_definitions()
    job = defs.resolve_job_def("opsdl_experiment")
    assert [n.name for n in job.graph.node_defs] == ["method_comparison"]
    full = defs.resolve_job_def("opsdl_full_pipeline")  # the main job does not train the baselines
    assert "method_comparison" not in {n.name for n in full.graph.node_defs}
    cfg = {"ops": {"method_comparison": {"config": {"seeds": [0], "steps": 4, "overrides": ["experiment.eval_n=5"]}}}}
    assert dg.validate_run_config(job, cfg)["ops"]["method_comparison"]["config"]["seeds"] == [0]
    with pytest.raises(dg.DagsterInvalidConfigError, match="seeds"):
        dg.validate_run_config(job, {"ops": {"method_comparison": {"config": {"seeds": "all"}}}})


def _curriculum_run(tiny_model_dir, families):
    return {"model": {"name": str(tiny_model_dir)},
            "data": {"source": "curriculum", "train_size": 6, "context_tokens": 200, "short_budget_tokens": 96,
                     "n_distractors": [1, 2], "heldout_size": 0,
                     "curriculum": {"families": families, "haystacks": {"noise": 1.0, "prose": 1.0}}},
            "rollout": {"samples_per_prompt": 2, "max_new_tokens": 6}, "lora": {"r": 4, "alpha": 8},
            "optim": {"lr": 5e-3}, "train": {"steps": 2, "num_threads": 1}}


def test_transfer_plan_leaves_families_out_of_training(tmp_path, tiny_model_dir):
    from opsdl_core.experiment.plan import task_labels

    fams = {"kv_lookup": 1.0, "counting": 1.0, "prose_attribute": 2.0}
    exp = load_experiment(_write(tmp_path, {"methods": ["opsdl"], "seeds": [0, 1],
                                            "heldout_families": ["prose_attribute", "event_date"]},
                                 _curriculum_run(tiny_model_dir, fams)))
    runs = plan_runs(exp)
    assert len(runs) == 2 and all(r.heldout == ("prose_attribute", "event_date") for r in runs)
    for r in runs:
        assert r.cfg.data.curriculum.families == {"kv_lookup": 1.0, "counting": 1.0, "prose_attribute": 0.0}
        assert sorted(r.trained_families) == ["counting", "kv_lookup"]
        assert task_labels(exp, r) == {"kv_lookup": ["in_family:kv_lookup"], "counting": ["in_family:counting"],
                                       "prose_attribute": ["out_of_family:prose_attribute"],
                                       "event_date": ["out_of_family:event_date"]}
    assert len({r.cfg.hash() for r in runs}) == 2 and len({r.cfg.train.run_dir for r in runs}) == 2
    loo = load_experiment(_write(tmp_path, {"methods": ["opsdl"], "seeds": [0], "protocol": "leave_one_out",
                                            "heldout_families": ["kv_lookup", "counting"]},
                                 _curriculum_run(tiny_model_dir, fams)))
    runs = plan_runs(loo)
    assert [r.heldout for r in runs] == [("kv_lookup",), ("counting",)]
    assert sorted(runs[0].trained_families) == ["counting", "prose_attribute"]
    # the base model's score on a family is the baseline of every label a fold gives it
    assert sorted(task_labels(loo, None)["kv_lookup"]) == ["in_family:kv_lookup", "out_of_family:kv_lookup"]
    with pytest.raises(ConfigError, match="experiment.heldout_families"):
        load_experiment(_write(tmp_path, {"heldout_families": ["telepathy"]}))
    with pytest.raises(ConfigError, match="no family left"):
        plan_runs(load_experiment(_write(tmp_path, {"heldout_families": ["kv_lookup"]},
                                         _curriculum_run(tiny_model_dir, {"kv_lookup": 1.0}))))


def test_transfer_experiment_on_a_tiny_model_reports_in_and_out_of_family(tmp_path, tiny_model_dir):
    from opsdl_core.experiment.run import run_experiment
    from opsdl_core.lineage.store import LineageStore

    db = tmp_path / "lineage.duckdb"
    cfg = _write(tmp_path, {"methods": ["opsdl"], "seeds": [0, 1], "lengths": [200], "eval_n": 3, "in_family_n": 2,
                            "heldout_families": ["event_date"], "max_new_tokens": 4, "db": str(db),
                            "diagnostic_prompts": 1, "diagnostic_samples": 1, "foreign_n": 7},
                 _curriculum_run(tiny_model_dir, {"kv_lookup": 1.0, "multi_hop": 1.0}))
    summary = run_experiment(load_experiment(cfg), log=lambda m: None)
    kinds = {(t["kind"], t["context_length"]): t for t in summary["transfer"]}
    assert set(kinds) == {("in_family", 200), ("in_family", 0), ("out_of_family", 200), ("out_of_family", 0)}
    assert kinds[("in_family", 200)]["tasks"] == 2 and kinds[("out_of_family", 200)]["tasks"] == 1
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "In-family against out-of-family gains" in md and "out_of_family:event_date" in md
    # the paired rows agree with the accuracies: per task, gained - lost = the change in right answers
    paired = {(r["tasks"], r["context_length"]): r for r in summary["paired"]}
    assert set(paired) >= {("out_of_family", 200), ("out_of_family:event_date", 200), ("in_family", 0)}
    scores = {r["method"]: r["scores"] for r in summary["table"]}
    for task, n in (("out_of_family:event_date", 3), ("in_family:kv_lookup", 2)):
        key, p = f"{task}|long|200", paired[(task, 200)]
        assert p["pairs"] == 2 * n  # every question, for each of the 2 seeds
        assert p["gained"] - p["lost"] == round(2 * n * (scores["opsdl"][key]["mean"] - scores["base"][key]["mean"]))
    assert "Questions gained and lost against the base model" in md
    assert "Wrong answers: a distractor's value or something else" in md
    # every stored answer carries its error kind
    import json

    rec = json.loads((tmp_path / "out" / "evals" / "base.json").read_text())
    got = [a for r in rec["rows"] for a in r.get("answers") or []]
    assert got and all((a["error"] is None) == a["correct"] for a in got)
    assert {a["error"] for a in got} <= {None, "distractor", "other"}
    _, got = LineageStore(db).query("SELECT change, count(*) FROM v_answer_changes WHERE task = "
                                    "'out_of_family:event_date' AND context_length = 200 GROUP BY ALL")
    got = dict(got)  # the same questions, paired in SQL
    p = paired[("out_of_family:event_date", 200)]
    assert (got.get("gained", 0), got.get("lost", 0), sum(got.values())) == (p["gained"], p["lost"], p["pairs"])
    store = LineageStore(db)
    _, rows = store.query("SELECT method, task, count(*), sum(n) FROM v_method_scores WHERE context = 'long' "
                          "GROUP BY ALL ORDER BY ALL")
    assert rows == [("base", "in_family:kv_lookup", 1, 2), ("base", "in_family:multi_hop", 1, 2),
                    ("base", "out_of_family:event_date", 1, 3),
                    ("opsdl", "in_family:kv_lookup", 2, 4), ("opsdl", "in_family:multi_hop", 2, 4),
                    ("opsdl", "out_of_family:event_date", 2, 6)]
    # the training data of each run (rebuilt from its saved config) holds no example of the held-out family
    from opsdl_core.config import RunConfig
    from opsdl_core.data.prepare import load_raw
    from opsdl_core.models.load import load_model_and_tokenizer

    tok = load_model_and_tokenizer(str(tiny_model_dir))[1]
    for seed in (0, 1):
        run_cfg = RunConfig.from_yaml(tmp_path / "out" / "configs" / f"opsdl-seed{seed}-without-event_date.yaml")
        train, _, _ = load_raw(run_cfg.data, tok)
        assert {e.metadata["family"] for e in train} == {"kv_lookup", "multi_hop"}
    # a model trained elsewhere, scored on the same suites beside the base model's scores
    from opsdl_core.experiment.suites import evaluate_external

    rows = evaluate_external(load_experiment(cfg), str(tiny_model_dir), "tiny-again", families=["event_date"],
                             log=lambda m: None)
    base_row = next(r for r in summary["table"] if r["method"] == "base")["scores"]["out_of_family:event_date|long|200"]
    assert [(r["task"], r["context_length"], r["n"]) for r in rows] == [("event_date", 200, 3)]
    assert rows[0]["base"] == base_row["mean"] == rows[0]["value"]  # the same model: the same greedy answers
    assert (rows[0]["paired"], rows[0]["gained"], rows[0]["lost"]) == (3, 0, 0)  # every question paired
    _, got = store.query("SELECT task, value FROM v_method_scores WHERE method = 'tiny-again'")
    assert got == [("event_date", rows[0]["value"])]


def test_paired_summary_counts_questions_gained_and_lost_over_seeds_and_tasks():
    from opsdl_core.experiment.report import paired_summary, sign_test_p

    T, F = True, False
    answers = {("base", None, "out_of_family:a", "long", 100): {"q1": T, "q2": F, "q3": F},
               ("opsdl", 0, "out_of_family:a", "long", 100): {"q1": F, "q2": T, "q3": T},
               ("opsdl", 1, "out_of_family:a", "long", 100): {"q1": T, "q2": T, "q3": F},
               ("base", None, "out_of_family:b", "long", 100): {"r1": F, "r2": T},
               ("opsdl", 0, "out_of_family:b", "long", 100): {"r1": F, "r2": F},
               ("opsdl", 1, "out_of_family:b", "long", 100): {"r1": T, "r2": T},
               ("opsdl", 0, "out_of_family:c", "long", 100): {"s1": T}}  # no base answers: left out
    rows = {(r["method"], r["tasks"], r["context_length"]): (r["gained"], r["lost"], r["pairs"])
            for r in paired_summary(answers)}
    assert rows == {("opsdl", "out_of_family:a", 100): (3, 1, 6), ("opsdl", "out_of_family:b", 100): (1, 1, 4),
                    ("opsdl", "out_of_family", 100): (4, 2, 10)}
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(1, 1) == 1.0
    assert sign_test_p(5, 0) == sign_test_p(0, 5) == 2 / 32
    assert abs(sign_test_p(10, 2) - 2 * (1 + 12 + 66) / 4096) < 1e-12


def test_error_summary_splits_wrong_answers_by_kind_over_seeds_and_tasks():
    from opsdl_core.experiment.report import errors_markdown, summarize

    def ans(*kinds):  # None: right
        return [{"id": f"q{i}", "output": "", "correct": k is None, **({"error": k} if k != "old" else {})}
                for i, k in enumerate(kinds)]

    def ev(method, seed, rows):
        return {"params": {"method": method, "seed": seed, "step": 4 if seed is not None else 0}, "rows": [
            {"task": t, "context": "long", "context_length": 100, "value": 0.0, "answers": a} for t, a in rows]}

    D, O = "distractor", "other"
    evals = [ev("base", None, [("out_of_family:a", ans(D, D, None)), ("out_of_family:b", ans(D, O))]),
             ev("opsdl", 0, [("out_of_family:a", ans(O, None, O)), ("out_of_family:b", ans(None, "old"))]),
             ev("opsdl", 1, [("out_of_family:a", ans(O, D, None)), ("out_of_family:b", ans(None, None))])]
    trained = [{"method": "opsdl", "seed": s, "steps": 4, "prompts": 4, "train_seconds": 1.0} for s in (0, 1)]
    settings = type("S", (), {"methods": ["opsdl"], "lengths": [100], "seeds": [0, 1], "curve_at": 100})()
    summary = summarize(evals, trained, settings)
    rows = {r["tasks"]: r["by_method"] for r in summary["errors"]}
    # per model: the base once, the trained method the mean over its 2 seeds
    assert rows["out_of_family:a"] == {"base": {"wrong": 2, "distractor": 2, "other": 0, "seeds": 1},
                                       "opsdl": {"wrong": 2, "distractor": 0.5, "other": 1.5, "seeds": 2}}
    assert rows["out_of_family"]["opsdl"] == {"wrong": 2.5, "distractor": 0.5, "other": 1.5, "seeds": 2}
    assert rows["out_of_family"]["base"] == {"wrong": 4, "distractor": 3, "other": 1, "seeds": 1}
    md = "\n".join(errors_markdown(summary))  # one answer stored without its kind: unclassified
    assert "| out_of_family | 100 | 4 (3 / 1) | 2.5 (0.5 / 1.5 / 0.5 unclassified) |" in md


def test_committed_ablation_config_plans_every_variant_on_the_main_jobs_prompts():
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "configs" / "ablation.yaml").read_text())
    names = list(raw["experiment"]["variants"])
    exp = load_experiment(root / "configs" / "ablation.yaml", [f"experiment.methods=[{','.join(names)}]"])
    runs = plan_runs(exp)
    assert [r.method for r in runs] == names and len({r.cfg.hash() for r in runs}) == len(names)
    assert all(r.cfg.data == exp.run.data and r.cfg.train.steps == 40 for r in runs)
    controls = {r.method: r.cfg.loss.control for r in runs if r.method.startswith("ctl-")}
    assert set(controls.values()) == {"long_prompt", "other_context", "constant_advantage"}
    # the pipeline's main job trains with the ablation's winner
    pipe = yaml.safe_load((root / "configs" / "pipeline.yaml").read_text())["ops"]["opsdl_model"]["config"]
    topk = next(r.cfg for r in runs if r.method == "topk100")
    assert pipe["loss"] == topk.loss.kind and "loss.topk=100" in pipe["overrides"]
    assert pipe["lr"] == topk.optim.lr and pipe["steps"] == topk.train.steps
