"""The Dagster pipeline on a tiny model, through Dagster's own APIs, with a real DuckDB file."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from assets import ALL_ASSETS, ALL_CHECKS, OpsdlResource
from opsdl_core.lineage.store import LineageStore
from pipelines.definitions import build_definitions, inbox_sensor

TINY_RUN_CONFIG = {
    "eval_sets": {"config": {"lengths": [160], "n": 3, "in_template_n": 2, "n_distractors": [2, 3], "foreign_n": 7}},
    "curated_prompts": {"config": {"size": 6, "context_tokens": 160, "n_distractors": [2, 3]}},
    "teacher_contexts": {"config": {"short_budget_tokens": 64}},
    "base_rollouts": {"config": {"n_prompts": 2, "samples_per_prompt": 2, "max_new_tokens": 6}},
    "opsdl_model": {"config": {"steps": 3, "lr": 5e-3, "lora_r": 4, "lora_alpha": 8, "samples_per_prompt": 2,
                               "max_new_tokens": 6, "save_every": 2, "num_threads": 1}},
    "evaluation": {"config": {"max_new_tokens": 4, "batch_size": 4}},
    "long_context_eval": {"config": {"tasks": ["opsdl_ruler_niah_single_1", "opsdl_ruler_vt"], "lengths": [512, 1024],
                                     "num_samples": 1}},
}


def _resources(home: Path, model_dir: Path) -> dict:
    return {"opsdl": OpsdlResource(home=str(home), model=str(model_dir), num_threads=1),
            "pipes_subprocess_client": dg.PipesSubprocessClient()}


def _materialize(home, model_dir, instance, run_config=TINY_RUN_CONFIG, selection=None):
    return dg.materialize([*ALL_ASSETS, *ALL_CHECKS], resources=_resources(home, model_dir), instance=instance,
                          run_config={"ops": run_config}, selection=selection)


@pytest.fixture(scope="module")
def pipeline_run(tiny_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("opsdl_home")
    instance = dg.DagsterInstance.ephemeral()
    result = _materialize(home, tiny_model_dir, instance)
    return home, instance, result


def test_definitions_load_with_every_stage_and_check():
    defs = build_definitions()
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == {"eval_sets", "curated_prompts", "quarantined_rows", "teacher_contexts", "base_rollouts",
                    "opsdl_model", "evaluation", "long_context_eval", "report", "method_comparison"}
    checks = {c.name for c in defs.resolve_asset_graph().asset_check_keys}
    assert checks == {"c_s_in_c_l_within_budget", "no_duplicate_prompts", "no_eval_overlap", "training_loss_finite",
                      "short_context_retention"}
    assert defs.resolve_job_def("opsdl_full_pipeline") and defs.resolve_job_def("opsdl_evaluation_only")
    assert defs.resolve_job_def("opsdl_experiment")
    assert defs.resolve_schedule_def("opsdl_weekly_retrain") and defs.resolve_sensor_def("inbox_sensor")


def test_whole_graph_materializes_and_lineage_is_complete(pipeline_run):
    home, instance, result = pipeline_run
    assert result.success
    checks = {ev.check_name: ev.passed for ev in result.get_asset_check_evaluations()}
    assert len(checks) == 5 and all(checks.values()), checks
    model = result.output_for_node("opsdl_model")
    report = result.output_for_node("report")
    assert Path(report["path"]).exists() and "Greedy accuracy" in Path(report["path"]).read_text()
    store = LineageStore(home / "lineage.duckdb")
    # dataset digest → teacher contexts → training run → checkpoint → evaluation run → scores
    _, rows = store.query("""
        SELECT p.digest AS prompts, t.digest AS teacher, r.run_id, c.checkpoint_id, s.run_id, count(*) AS n_scores
        FROM datasets p
        JOIN lineage_edges e1 ON e1.src_type = 'dataset' AND e1.src_id = p.digest AND e1.dst_type = 'dataset'
        JOIN datasets t ON t.digest = e1.dst_id AND t.kind = 'teacher_contexts'
        JOIN lineage_edges e2 ON e2.src_type = 'dataset' AND e2.src_id = t.digest AND e2.dst_type = 'run'
        JOIN runs r ON r.run_id = e2.dst_id AND r.kind = 'train'
        JOIN checkpoints c ON c.run_id = r.run_id AND c.kind = 'merged'
        JOIN lineage_edges e3 ON e3.src_type = 'checkpoint' AND e3.src_id = c.checkpoint_id AND e3.relation = 'evaluated'
        JOIN eval_scores s ON s.run_id = e3.dst_id AND s.checkpoint_id = c.checkpoint_id
        WHERE p.kind = 'prompts'
        GROUP BY ALL""")
    assert len(rows) == 2, rows  # the synthetic suites' evaluation and lm-eval's
    (prompts, teacher, run_id, ckpt, _, n_scores), (*_, lm_run, lm_scores) = sorted(rows, key=lambda r: r[4])
    assert run_id == model["run_id"] and ckpt == model["checkpoint_id"]
    assert n_scores == 4  # kv_heldout long + short, kv_in_template long, foreign (formats never trained) short
    assert lm_run.startswith("lmeval-") and lm_scores == 4  # 2 tasks x 2 lengths
    _, prov = store.query("SELECT base_model, teacher_context, loss_kind, input_datasets FROM v_checkpoint_provenance "
                          "WHERE checkpoint_id = ?", [ckpt])
    assert prov[0][1] == "oracle" and prov[0][2] == "pointwise" and teacher in prov[0][3]
    assert store.count("metrics", "WHERE run_id = ?", [run_id]) > 3 * 10
    assert store.count("rollout_samples") == 4
    # every response token of the base rollouts, with its student and teacher log-probs
    _, ((n_tok, n_gap, n_pos),) = store.query("SELECT (SELECT sum(n_tokens) FROM rollout_samples), count(*), "
                                              "count(DISTINCT position) FROM v_token_gaps")
    assert n_tok == n_gap > 0 and n_pos >= 1
    # lm-eval's per-length scores of both models, with where they came from
    lc = result.output_for_node("long_context_eval")
    _, got = store.query("SELECT checkpoint_id, task, context_length, n, harness, task_config_hash, dataset_digest "
                         "FROM eval_scores WHERE harness LIKE 'lm-eval %' ORDER BY ALL")
    base = next(c for c, *_ in got if c.startswith("base:"))
    assert {(c, t, x) for c, t, x, *_ in got} == {(c, t, x) for c in (base, ckpt) for x in (512, 1024)
                                                   for t in ("opsdl_ruler_niah_single_1", "opsdl_ruler_vt")}
    assert all(n == 1 and cfg_hash and digest for _, _, _, n, _, cfg_hash, digest in got)
    assert set(lc["run_ids"]) == {"base", "opsdl"} and Path(lc["plot"]).stat().st_size > 1000
    text = Path(report["path"]).read_text()
    assert "opsdl_ruler_niah_single_1 per context length (lm-eval)" in text and "| 512 | 1024 |" in text
    # the Dagster instance knows every asset's latest materialization
    for key in ("eval_sets", "curated_prompts", "teacher_contexts", "opsdl_model", "evaluation", "long_context_eval",
                "report"):
        assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None, key


def test_rematerializing_adds_no_duplicate_rows(pipeline_run, tiny_model_dir):
    home, instance, _ = pipeline_run
    store = LineageStore(home / "lineage.duckdb")
    tables = ["runs", "params", "metrics", "datasets", "lineage_edges", "checkpoints", "eval_scores", "rollout_samples"]
    before = {t: store.count(t) for t in tables}
    result = _materialize(home, tiny_model_dir, instance)
    assert result.success
    assert {t: store.count(t) for t in tables} == before
    # nothing was evaluated twice: the same checkpoints under the same evaluations come from DuckDB
    logs = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any("base-model scores reused from lineage run" in m for m in logs)
    assert sum("scores reused from lineage run" in m and "same checkpoint and evaluation" in m for m in logs) == 2


def test_inbox_quarantines_bad_files_and_keeps_good_ones(pipeline_run, tiny_model_dir, tmp_path):
    home, instance, _ = pipeline_run
    store = LineageStore(home / "lineage.duckdb")
    n_datasets = store.count("datasets")
    inbox = home / "inbox"
    inbox.mkdir(exist_ok=True)
    good = [{"long_context": f"Filler {i}. The code of box {i} is {1000 + i}. More filler text here.",
             "short_context": f"The code of box {i} is {1000 + i}.", "question": f"What is the code of box {i}?",
             "answer": str(1000 + i)} for i in range(4)]
    (inbox / "good.jsonl").write_text("\n".join(json.dumps(r) for r in good))
    (inbox / "bad_json.jsonl").write_text('{"long_context": "x", \n')
    (inbox / "missing.jsonl").write_text(json.dumps({"long_context": "abc", "question": "q?"}))
    (inbox / "latin1.jsonl").write_bytes('{"long_context": "caf\xe9", "short_context": "caf", "question": "q"}'
                                         .encode("latin-1"))
    (inbox / "not_in_cl.jsonl").write_text(json.dumps({"long_context": "one two three", "short_context": "four",
                                                       "question": "q?"}))
    run_config = {"eval_sets": TINY_RUN_CONFIG["eval_sets"],
                  "curated_prompts": {"config": {"source": "inbox", "size": 10}}}
    result = _materialize(home, tiny_model_dir, instance, run_config=run_config,
                          selection=["eval_sets", "curated_prompts", "quarantined_rows"])
    assert result.success
    prompts = result.output_for_node("curated_prompts", "curated_prompts")
    quarantine = result.output_for_node("curated_prompts", "quarantined_rows")
    assert prompts["n"] == 4
    rows = [json.loads(line) for line in Path(quarantine["path"]).read_text().splitlines()]
    by_file = {Path(r["source"]).name: r for r in rows}
    assert set(by_file) == {"bad_json.jsonl", "missing.jsonl", "latin1.jsonl", "not_in_cl.jsonl"}
    assert "JSON" in by_file["bad_json.jsonl"]["reason"]
    assert by_file["missing.jsonl"]["field"] == "short_context"
    assert "UTF-8" in by_file["latin1.jsonl"]["reason"] or "utf-8" in by_file["latin1.jsonl"]["reason"]
    assert by_file["not_in_cl.jsonl"]["field"] == "short_context"
    # what was stored before is still there; the new datasets were added next to it
    assert store.count("datasets") == n_datasets + 2
    assert store.count("runs", "WHERE kind = 'train'") == 1


def test_inbox_sensor_requests_a_run_once_per_change(tmp_path):
    opsdl = OpsdlResource(home=str(tmp_path), model="unused")
    ctx = dg.build_sensor_context(resources={"opsdl": opsdl})
    assert isinstance(inbox_sensor(ctx), dg.SkipReason)
    (tmp_path / "inbox" / "a.jsonl").write_text("{}\n")
    ctx = dg.build_sensor_context(resources={"opsdl": opsdl})
    req = inbox_sensor(ctx)
    assert isinstance(req, dg.RunRequest) and req.run_config["ops"]["curated_prompts"]["config"]["source"] == "inbox"
    ctx2 = dg.build_sensor_context(cursor=ctx.cursor, resources={"opsdl": opsdl})
    assert isinstance(inbox_sensor(ctx2), dg.SkipReason)


def test_committed_main_job_run_config_is_valid():
    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "pipeline.yaml").read_text())
    job = build_definitions().resolve_job_def("opsdl_full_pipeline")
    resolved = dg.validate_run_config(job, cfg)
    assert resolved["ops"]["opsdl_model"]["config"]["steps"] == cfg["ops"]["opsdl_model"]["config"]["steps"]
    with pytest.raises(dg.DagsterInvalidConfigError, match="lr"):
        dg.validate_run_config(job, {"ops": {"opsdl_model": {"config": {"lr": "fast"}}}})


def test_retention_check_is_exact_at_its_margin():
    from assets.checks import within_margin

    assert 0.7 - 0.8 < -0.1  # the floating-point difference that failed a real run at exactly the margin
    assert within_margin(0.7 - 0.8, 0.10) and within_margin(0.0, 0.10)
    assert not within_margin(0.65 - 0.8, 0.10) and not within_margin(-0.1 - 1e-6, 0.10)


def test_retention_check_pools_small_suites_unless_asked_per_suite():
    from assets.checks import retention_verdict

    rows = [{"suite": f"in_family:f{i}@1024", "context": "short", "n": 16, "delta": d}
            for i, d in enumerate([0.0, 0.0, 0.0, -0.125])]
    rows.append({"suite": "x", "context": "long", "n": 16, "delta": -0.9})
    pooled = retention_verdict(rows, 0.10)
    assert pooled["passed"] and pooled["pooled_delta"] == pytest.approx(-0.03125)  # long rows do not count
    assert pooled["worst_suite"] == "in_family:f3@1024" and pooled["worst_delta"] == -0.125
    assert not retention_verdict(rows, 0.10, per_suite=True)["passed"]
    weighted = [{"suite": "big", "context": "short", "n": 90, "delta": -0.2},
                {"suite": "small", "context": "short", "n": 10, "delta": 0.5}]
    v = retention_verdict(weighted, 0.10)  # question-weighted: -0.13, not the plain mean +0.15
    assert not v["passed"] and v["pooled_delta"] == pytest.approx(-0.13)
    assert not retention_verdict([r for r in rows if r["context"] == "long"], 0.10)["passed"]
    # the foreign-format suite is judged on its own: pooled with the others it would hide a 30-point drop
    foreign = rows + [{"suite": "foreign@0", "context": "short", "n": 140, "delta": -0.3}]
    v = retention_verdict(foreign, 0.10)
    assert not v["passed"] and v["foreign_delta"] == -0.3 and v["pooled_delta"] == pytest.approx(-0.03125)
    ok = retention_verdict(rows + [{"suite": "foreign@0", "context": "short", "n": 140, "delta": -0.05}], 0.10)
    assert ok["passed"] and ok["foreign_delta"] == -0.05


def test_curriculum_source_mixes_families_and_holds_some_out(pipeline_run, tiny_model_dir):
    import collections

    home, instance, _ = pipeline_run
    run_config = {"eval_sets": {"config": {"lengths": [200], "n": 2, "families": ["kv_lookup", "counting"],
                                           "heldout_families": ["event_date"], "n_distractors": [1, 2]}},
                  "curated_prompts": {"config": {"source": "curriculum", "size": 9, "context_tokens": 200,
                                                 "n_distractors": [1, 2], "haystacks": {"noise": 1, "prose": 2},
                                                 "families": {"kv_lookup": 2.0, "counting": 1.0}}}}
    result = _materialize(home, tiny_model_dir, instance, run_config=run_config,
                          selection=["eval_sets", "curated_prompts", "quarantined_rows"])
    assert result.success
    suites = result.output_for_node("eval_sets")["suites"]
    assert set(suites) == {"in_family:kv_lookup@200", "in_family:counting@200", "out_of_family:event_date@200",
                           "foreign@0"}  # and the foreign-format retention suite, whatever the source
    assert suites["foreign@0"]["n"] == 140 and suites["foreign@0"]["context_length"] == 0
    prompts = result.output_for_node("curated_prompts", "curated_prompts")
    from assets.curation import read_examples

    exs = read_examples(prompts["path"])
    assert collections.Counter(e.metadata["family"] for e in exs) == {"kv_lookup": 6, "counting": 3}
    assert collections.Counter(e.metadata["haystack"] for e in exs) == {"prose": 6, "noise": 3}
    bad = {"eval_sets": run_config["eval_sets"],
           "curated_prompts": {"config": {"source": "curriculum", "size": 4, "families": {"kv_lookup": 1.0,
                                                                                         "telepathy": 1.0}}}}
    with pytest.raises(dg.Failure, match="data.curriculum.families"):
        _materialize(home, tiny_model_dir, instance, run_config=bad,
                     selection=["eval_sets", "curated_prompts", "quarantined_rows"])


def test_report_table_writes_small_sign_test_p_values_readably():
    from assets.evaluation import table_rows

    rows = [{"suite": "a", "sign_p": 0.0004}, {"suite": "b", "sign_p": 0.0223}, {"suite": "c", "sign_p": None}]
    assert [r["sign_p"] for r in table_rows(rows)] == ["< 0.001", "0.022", ""]
    assert rows[0]["sign_p"] == 0.0004, "the stored rows keep the number"


def test_every_asset_says_what_it_is_who_owns_it_and_where_it_queues():
    """Dagster conventions: kinds, a description, owners and the code version on every asset; the
    model-loading ones in the CPU pool (one at a time across runs where the instance sets a limit)."""
    from assets.resources import CODE_VERSION, CPU_POOL, HEAVY

    defs = build_definitions(OpsdlResource())
    graph = defs.resolve_asset_graph()
    keys = list(graph.get_all_asset_keys())
    assert len(keys) >= 10
    for key in keys:
        node = graph.get(key)
        assert node.description and len(node.description) > 20, key
        assert node.owners == ["team:opsdl"], key
        assert node.kinds, key
        assert node.code_version == CODE_VERSION, key
    heavy = [a for a in [*ALL_ASSETS] if getattr(a, "op", None) and a.op.tags.get("opsdl/cpu") == HEAVY["opsdl/cpu"]]
    assert heavy and all(a.op.pool == CPU_POOL for a in heavy)


def test_dagster_validates_the_code_location(tmp_path):
    """`dagster definitions validate` on the code location, as the web UI and the CLI load it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    proc = subprocess.run([str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w",
                           "workspace.yaml"], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Validation successful" in proc.stdout + proc.stderr


def test_launchpad_fields_mean_the_run_config_files_value_and_defaults_live_in_run_config(tmp_path):
    """One config vocabulary: the training asset's form is a run-config file + headline fields that mean
    the file's value unless set + overrides; with nothing set it is the library's RunConfig; the other
    assets' run-config fields take their defaults and help from RunConfig."""
    import functools

    import yaml

    from assets.curation import CurationConfig
    from assets.teacher import TeacherContextConfig
    from assets.training import HEADLINE_FIELDS, TrainingConfig
    from opsdl_core.config import RunConfig
    from opsdl_core.config_reference import field_default, field_help

    def build(cfg: TrainingConfig) -> RunConfig:
        return cfg.run_config(model="m", model_cache_dir=None, data={"source": "x.jsonl"}, run_dir=str(tmp_path / "r"))

    lib = RunConfig()
    plain = build(TrainingConfig())
    for name, path in HEADLINE_FIELDS.items():
        assert field_help(path) in TrainingConfig.model_fields[name].description, name
        assert TrainingConfig.model_fields[name].default is None, name
        assert field_default(path) == functools.reduce(getattr, path.split("."), plain), path
    assert plain.optim.lr == 1e-4 and plain.rollout.samples_per_prompt == lib.rollout.samples_per_prompt
    assert plain.model.name == "m" and plain.data.source == "x.jsonl" and plain.eval.enabled is False
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump({"model": {"name": "ignored"}, "data": {"source": "ignored"},
                                        "optim": {"lr": 3e-4}, "rollout": {"temperature": 0.5},
                                        "loss": {"kind": "jsd", "jsd_beta": 0.3}}))
    from_file = build(TrainingConfig(run_config_file=str(run_file)))
    assert (from_file.optim.lr, from_file.rollout.temperature, from_file.loss.kind, from_file.loss.jsd_beta) == \
        (3e-4, 0.5, "jsd", 0.3)
    assert from_file.model.name == "m" and from_file.data.source == "x.jsonl"  # the pipeline's own sections
    mixed = build(TrainingConfig(run_config_file=str(run_file), lr=5e-5, overrides=["loss.jsd_beta=0.7"]))
    assert (mixed.optim.lr, mixed.rollout.temperature, mixed.loss.jsd_beta) == (5e-5, 0.5, 0.7)
    from opsdl_core.config import ConfigError
    with pytest.raises(ConfigError, match="loss.kind"):
        build(TrainingConfig(loss="ppo"))
    assert TeacherContextConfig().short_budget_tokens == lib.data.short_budget_tokens
    assert TeacherContextConfig().window_tokens == lib.data.window_tokens
    assert CurationConfig().size == lib.data.train_size and CurationConfig().n_distractors == list(lib.data.n_distractors)
    assert field_help("data.short_budget_tokens") in TeacherContextConfig.model_fields["short_budget_tokens"].description


def test_artifact_folders_stay_under_the_home(tmp_path):
    from assets.resources import OpsdlResource

    res = OpsdlResource(home=str(tmp_path / "home"))
    assert res.artifacts("experiments", "headline") == tmp_path / "home" / "artifacts" / "experiments" / "headline"
    for bad in ("../../outside", "..", "a/b", "", "x\0y"):
        with pytest.raises(ValueError, match="artifact folder name"):
            res.artifacts("experiments", bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
