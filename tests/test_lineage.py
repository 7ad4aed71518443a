"""The DuckDB lineage store: schema, idempotent upserts, views, concurrent writers, CLI."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import duckdb
import pytest

from opsdl_core.cli import main as cli_main
from opsdl_core.lineage.store import SCHEMA_VERSION, LineageStore, content_hash, flatten_params, ingest_training_run


def _fill(store: LineageStore, run_id: str, lr: str = "0.0001", loss: str = "pointwise") -> None:
    store.log_dataset("d" * 16, name="prompts", kind="prompts", n_rows=10)
    store.log_run(run_id, kind="train", params={"optim": {"lr": lr}, "loss": {"kind": loss},
                                                 "data": {"teacher_context": "oracle"}},
                  config_hash=f"cfg-{run_id}", base_model="tiny", started_at=0.0, ended_at=10.0)
    store.log_edge(("dataset", "d" * 16), ("run", run_id), "input", run_id=run_id)
    store.log_metrics(run_id, [{"step": 1, "loss": 0.5, "kl_estimate": 1.0}, {"step": 2, "loss": 0.25}])


def test_schema_upserts_and_views(tmp_path):
    store = LineageStore(tmp_path / "l.duckdb")
    _fill(store, "r1")
    _fill(store, "r1")  # re-materialized: replaced, not duplicated
    assert store.count("runs") == 1 and store.count("params") == 3 and store.count("metrics") == 3
    assert store.count("lineage_edges") == 1 and store.count("datasets") == 1
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "w.bin").write_bytes(b"abc")
    cid = store.log_checkpoint("r1", ck, kind="adapter", step=2)
    assert cid == content_hash(ck)
    store.log_eval_scores("e1", cid, [{"task": "kv", "context": "long", "context_length": 1024,
                                       "metric": "acc", "value": 0.5, "n": 10}], dataset_digest="h" * 16)
    store.log_eval_scores("e1", cid, [{"task": "kv", "context": "long", "context_length": 1024,
                                       "metric": "acc", "value": 0.75, "n": 10}], dataset_digest="h" * 16)
    cols, rows = store.query("SELECT value FROM eval_scores")
    assert rows == [(0.75,)]
    cols, rows = store.query("SELECT checkpoint_id, input_datasets, teacher_context, loss_kind "
                             "FROM v_checkpoint_provenance")
    assert rows == [(cid, "d" * 16, "oracle", "pointwise")]
    cols, rows = store.query("SELECT train_run_id, train_datasets, context_length, value FROM v_scores")
    assert rows == [("r1", "d" * 16, 1024, 0.75)]
    assert store.query("SELECT value FROM v_metric_latest WHERE key = 'loss'")[1] == [(0.25,)]


def _old_schema_store(path, version: int, ddl: str) -> LineageStore:
    """A file written by an older opsdl (its schema version and tables, by ``ddl``), opened now:
    migrated to the current version."""
    con = duckdb.connect(str(path))
    con.execute(f"CREATE TABLE schema_info (version INTEGER NOT NULL); INSERT INTO schema_info VALUES ({version});"
                + ddl)
    con.close()
    store = LineageStore(path)
    assert store.query("SELECT version FROM schema_info")[1] == [(SCHEMA_VERSION,)]
    return store


def test_a_schema_v1_file_is_migrated_with_its_rows_kept(tmp_path):
    store = _old_schema_store(
        tmp_path / "v1.duckdb", 1,
        "CREATE TABLE eval_scores (run_id VARCHAR NOT NULL, checkpoint_id VARCHAR NOT NULL, task VARCHAR "
        "NOT NULL, context VARCHAR NOT NULL, context_length BIGINT NOT NULL, metric VARCHAR NOT NULL, "
        "value DOUBLE, n BIGINT, dataset_digest VARCHAR, "
        "PRIMARY KEY (run_id, checkpoint_id, task, context, context_length, metric));"
        "INSERT INTO eval_scores VALUES ('e0', 'c0', 'kv', 'long', 512, 'acc', 0.25, 8, 'd0')")
    assert store.query("SELECT value, stderr, harness FROM eval_scores")[1] == [(0.25, None, None)]
    store.log_eval_scores("e1", "c1", [{"task": "ruler", "context": "long", "context_length": 1024, "metric": "acc",
                                        "value": 0.5, "stderr": 0.1, "n": 25, "harness": "lm-eval 0.4.13",
                                        "task_config_hash": "abc"}])
    assert store.query("SELECT stderr, harness, task_config_hash FROM v_scores WHERE eval_run_id = 'e1'")[1] == [
        (0.1, "lm-eval 0.4.13", "abc")]
    with pytest.raises(ValueError, match="unknown table 'runs; DROP TABLE runs'"):
        store.count("runs; DROP TABLE runs")


def test_a_schema_v3_file_gets_error_kinds_with_its_answers_kept(tmp_path):
    store = _old_schema_store(
        tmp_path / "v3.duckdb", 3,
        "CREATE TABLE eval_answers (run_id VARCHAR NOT NULL, checkpoint_id VARCHAR NOT NULL, task VARCHAR "
        "NOT NULL, context VARCHAR NOT NULL, context_length BIGINT NOT NULL, metric VARCHAR NOT NULL, "
        "example_id VARCHAR NOT NULL, dataset_digest VARCHAR, output VARCHAR, correct BOOLEAN NOT NULL, "
        "PRIMARY KEY (run_id, checkpoint_id, task, context, context_length, metric, example_id));"
        "INSERT INTO eval_answers VALUES ('e0', 'c0', 'kv', 'long', 512, 'accuracy', 'q0', 'd0', 'x', false)")
    assert store.query("SELECT example_id, output, correct, error FROM eval_answers")[1] == [("q0", "x", False, None)]
    store.log_eval_scores("e1", "c1", [{"task": "kv", "context": "long", "context_length": 512, "metric": "accuracy",
                                        "value": 0.0, "answers": [{"id": "q0", "correct": False,
                                                                   "error": "distractor"}]}])
    assert store.query("SELECT error FROM eval_answers WHERE run_id = 'e1'")[1] == [("distractor",)]


def test_answers_behind_scores_give_the_questions_gained_and_lost(tmp_path):
    store = LineageStore(tmp_path / "l.duckdb")

    def score(run_id, method, seed, correct, value=None):
        store.log_run(run_id, experiment="x", kind="eval", params={"method": method, "seed": seed, "step": 4})
        answers = [{"id": f"q{i}", "output": f"out{i}-{method}", "correct": c, "error": None if c else "other"}
                   for i, c in enumerate(correct)]
        store.log_eval_scores(run_id, f"ckpt-{run_id}", [{"task": "kv", "context": "long", "context_length": 512,
                                                           "metric": "accuracy", "value": sum(correct) / 3,
                                                           "dataset_digest": "d1", "answers": answers}])

    score("e-base", "base", None, [True, False, False])
    score("e-s0", "opsdl", 0, [False, True, True])
    score("e-s1", "opsdl", 1, [True, True, False])
    _, rows = store.query("SELECT seed, change, count(*) FROM v_answer_changes GROUP BY ALL ORDER BY ALL")
    assert rows == [(0, "gained", 2), (0, "lost", 1), (1, "gained", 1), (1, "same", 2)]
    _, rows = store.query("SELECT base_output, output FROM v_answer_changes WHERE seed = 0 AND example_id = 'q0'")
    assert rows == [("out0-base", "out0-opsdl")]
    _, rows = store.query("SELECT base_error, error FROM v_answer_changes WHERE seed = 0 ORDER BY example_id")
    assert rows == [(None, "other"), ("other", None), ("other", None)]
    # an error kind on a right answer, or an unknown kind, is refused like a malformed answer
    for bad in ({"id": "q0", "correct": True, "error": "other"}, {"id": "q0", "correct": False, "error": "typo"}):
        with pytest.raises(ValueError, match=r"answer #0 \(q0\): 'error'"):
            store.log_eval_scores("e-bad", "c", [{"task": "kv", "context": "long", "metric": "accuracy",
                                                  "value": 0.0, "answers": [bad]}])
    # a malformed answer is refused, naming the score and the answer, and nothing of that call is stored
    with pytest.raises(ValueError, match=r"eval score #0 \(kv\), answer #1: expected an 'id' and a boolean"):
        store.log_eval_scores("e-bad", "c", [{"task": "kv", "context": "long", "metric": "accuracy", "value": 1.0,
                                              "answers": [{"id": "q0", "correct": True}, {"id": "q1", "correct": 1}]}])
    assert store.count("eval_scores", "WHERE run_id = 'e-bad'") == 0 == store.count("eval_answers",
                                                                                     "WHERE run_id = 'e-bad'")


def test_per_token_gaps_are_stored_and_averaged_by_position(tmp_path):
    store = LineageStore(tmp_path / "l.duckdb")
    rows = [{"example_id": f"e{i}", "sample_index": 0, "step": 0, "response": "ab", "n_tokens": 2,
             "token_ids": [5, 6], "tokens": ["a", "b"], "student_token_logprobs": [-1.0, -2.0 - i],
             "teacher_token_logprobs": [-0.5, -1.0]} for i in range(2)]
    assert store.log_rollout_samples("r", rows) == 2
    _, gaps = store.query("SELECT position, mean_gap, n FROM v_gap_by_position WHERE run_id = 'r' ORDER BY position")
    assert gaps == [(0, -0.5, 2), (1, -1.5, 2)]  # position 1: mean of (-2+1) and (-3+1)
    _, toks = store.query("SELECT example_id, position, token, gap FROM v_token_gaps ORDER BY ALL")
    assert toks[:2] == [("e0", 0, "a", -0.5), ("e0", 1, "b", -1.0)]
    bad = [{**rows[0], "example_id": "x", "tokens": ["a"]}]
    with pytest.raises(ValueError, match=r"rollout sample #0 \(x\): per-token lists differ in length"):
        store.log_rollout_samples("r", bad)
    assert store.count("rollout_samples") == 2


def test_param_diff_view_finds_runs_differing_in_one_parameter(tmp_path):
    store = LineageStore(tmp_path / "l.duckdb")
    _fill(store, "a", lr="0.0001")
    _fill(store, "b", lr="0.0002")
    _fill(store, "c", lr="0.0002", loss="jsd")  # differs from a in two params, from b in one
    _, rows = store.query("SELECT run_a, run_b, key, value_a, value_b FROM v_run_param_diffs ORDER BY run_a, run_b")
    assert rows == [("a", "b", "optim.lr", "0.0001", "0.0002"), ("b", "c", "loss.kind", "pointwise", "jsd")]


def test_failed_transaction_leaves_stored_rows_untouched(tmp_path):
    store = LineageStore(tmp_path / "l.duckdb")
    _fill(store, "r1")
    with pytest.raises(ValueError, match="eval score #1: missing field 'metric'"):
        store.log_eval_scores("e1", "c", [{"task": "t", "context": "long", "metric": "acc", "value": 1.0},
                                          {"task": "t", "context": "long", "value": 1.0}])
    with pytest.raises(duckdb.Error):
        with store.transaction() as con:
            con.execute("DELETE FROM runs")
            con.execute("INSERT INTO no_such_table VALUES (1)")
    assert store.count("runs") == 1 and store.count("eval_scores") == 0


def _writer(db: str, k: int, n: int) -> None:
    store = LineageStore(db, lock_timeout_s=120)
    for i in range(n):
        rid = f"w{k}-{i}"
        store.log_run(rid, kind="train", params={"k": k, "i": i}, experiment=f"exp{k % 2}")
        store.log_metrics(rid, [{"step": s, "loss": float(s)} for s in range(5)])
        store.log_edge(("dataset", f"ds{k}"), ("run", rid), "input", run_id=rid)


def test_concurrent_writer_processes_lose_nothing(tmp_path):
    db = str(tmp_path / "l.duckdb")
    LineageStore(db)
    ctx = mp.get_context("spawn")  # like Dagster's step processes: fresh interpreters
    procs = [ctx.Process(target=_writer, args=(db, k, 6)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    store = LineageStore(db)
    assert store.count("runs") == 24
    assert store.count("metrics") == 24 * 5
    assert store.count("params") == 24 * 2
    assert store.count("lineage_edges") == 24
    assert store.count("experiments") == 2


def _outside_reader(db: str, stop: str, out: str) -> None:
    """A user's own DuckDB session polling the file read-only, as the duckdb CLI does."""
    import time

    polls = 0
    while not Path(stop).exists():
        try:
            con = duckdb.connect(db, read_only=True)
        except duckdb.IOException:  # a write holds the file right now
            time.sleep(0.002)
            continue
        con.execute("SELECT count(*) FROM metrics").fetchone()
        time.sleep(0.02)  # held open a while, as an interactive query would be
        con.close()
        polls += 1
    Path(out).write_text(str(polls))


def test_writers_beside_an_outside_read_only_session_lose_nothing(tmp_path):
    db = str(tmp_path / "l.duckdb")
    LineageStore(db)
    ctx = mp.get_context("spawn")
    stop, polls = tmp_path / "stop", tmp_path / "polls"
    reader = ctx.Process(target=_outside_reader, args=(db, str(stop), str(polls)))
    reader.start()
    writers = [ctx.Process(target=_writer, args=(db, k, 4)) for k in range(3)]
    for p in writers:
        p.start()
    import time

    waits = []  # the store's own reads meanwhile: they queue behind no writer, only behind an open write
    while any(p.is_alive() for p in writers):
        t0 = time.monotonic()
        LineageStore(db, read_only=True).query("SELECT count(*) FROM metrics")
        waits.append(time.monotonic() - t0)
        time.sleep(0.05)
    for p in writers:
        p.join(180)
    stop.touch()
    reader.join(60)
    assert [p.exitcode for p in writers] == [0, 0, 0] and reader.exitcode == 0
    assert int(polls.read_text()) > 0  # the outside session did hold the file between writes
    assert waits and max(waits) < 30, max(waits)  # a read waited up to 68 s when reads queued on the writers' lock
    store = LineageStore(db, read_only=True)
    assert store.count("runs") == 12 and store.count("metrics") == 12 * 5 and store.count("lineage_edges") == 12


def test_a_write_blocked_past_the_timeout_fails_naming_the_holder_and_stores_nothing_partial(tmp_path):
    from opsdl_core.lineage.store import LineageLockTimeout

    db = str(tmp_path / "l.duckdb")
    _fill(LineageStore(db), "r1")
    ctx = mp.get_context("spawn")
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    holder = ctx.Process(target=_hold_read_only, args=(db, str(ready), str(stop)))
    holder.start()
    try:
        while not ready.exists():
            assert holder.is_alive()
        store = LineageStore(db, lock_timeout_s=0.5)
        with pytest.raises(LineageLockTimeout, match=r"held by .*PID"):
            store.log_metrics("r1", [{"step": 3, "loss": 0.1}])
    finally:
        stop.touch()
        holder.join(30)
    assert LineageStore(db).log_metrics("r1", [{"step": 3, "loss": 0.1}]) == 1  # the retry after it stores it
    assert LineageStore(db, read_only=True).count("metrics", "WHERE step = 3") == 1


def _hold_read_only(db: str, ready: str, stop: str) -> None:
    import time

    con = duckdb.connect(db, read_only=True)
    Path(ready).touch()
    while not Path(stop).exists():
        time.sleep(0.01)
    con.close()


def test_reads_write_nothing_and_sql_cannot_touch_files(tmp_path, capsys):
    import hashlib

    db = tmp_path / "l.duckdb"
    _fill(LineageStore(db), "r1")
    before = (hashlib.sha256(db.read_bytes()).hexdigest(), db.stat().st_mtime_ns)
    LineageStore(db).query("SELECT count(*) FROM runs")  # opening a current store writes nothing either
    for sql in ("COPY runs TO 'out.csv'", f"COPY (SELECT 1) TO '{tmp_path / 'o.csv'}'",
                f"EXPORT DATABASE '{tmp_path / 'export'}'", f"ATTACH '{tmp_path / 'x.duckdb'}' AS x",
                "SELECT * FROM read_csv('/etc/hostname')", "SET enable_external_access = true",
                "CREATE TABLE t AS SELECT 1", "DELETE FROM runs"):
        assert cli_main(["lineage", "--db", str(db), "sql", sql]) == 1, sql
        assert "Error" in capsys.readouterr().err
    assert cli_main(["lineage", "--db", str(db), "sql", "SELECT count(*) AS n FROM runs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 1}]
    assert cli_main(["lineage", "--db", str(db), "tables"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.duckdb", "l.duckdb.lock"]
    assert (hashlib.sha256(db.read_bytes()).hexdigest(), db.stat().st_mtime_ns) == before
    with pytest.raises(PermissionError, match="read-only"):
        LineageStore(db, read_only=True).log_metrics("r1", [{"step": 9, "loss": 1.0}])


def test_flatten_params():
    assert flatten_params({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "null"}


def test_ingest_training_run_and_cli(tmp_path, capsys):
    rd = tmp_path / "run"
    (rd / "final" / "adapter").mkdir(parents=True)
    (rd / "final" / "adapter" / "a.safetensors").write_bytes(b"x" * 10)
    (rd / "checkpoints" / "step-000002").mkdir(parents=True)
    (rd / "checkpoints" / "step-000002" / "state.json").write_text("{}")
    (rd / "run.json").write_text(json.dumps({"config_hash": "c1", "data_digest": "dd", "model": "tiny",
                                             "model_hash": "mh", "steps": 2}))
    (rd / "config.yaml").write_text("optim:\n  lr: 0.0001\n")
    (rd / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 1.0 / s, "step_s": 2.0})
                                                for s in (1, 2)))
    (rd / "checkpoints.jsonl").write_text(json.dumps({"step": 2, "path": "step-000002"}) + "\n"
                                          + json.dumps({"step": 1, "path": "step-000001"}) + "\n")
    db = tmp_path / "l.duckdb"
    store = LineageStore(db)
    res = ingest_training_run(store, rd, experiment="e")
    assert res["run_id"] == "train-c1-dd" and len(res["checkpoints"]) == 1 and set(res["final"]) == {"adapter"}
    ingest_training_run(store, rd, experiment="e")
    assert store.count("checkpoints") == 2 and store.count("metrics") == 4
    _, rows = store.query("SELECT status, base_model_hash, json_extract(timings, '$.step_s')::DOUBLE FROM runs")
    assert rows == [("finished", "mh", 4.0)]

    assert cli_main(["lineage", "--db", str(db), "sql", "SELECT key, step, value FROM metrics ORDER BY step, key"]) == 0
    out = capsys.readouterr().out
    assert "loss" in out and "(4 rows)" in out
    assert cli_main(["lineage", "--db", str(db), "sql", "SELECT run_id FROM runs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"run_id": "train-c1-dd"}]
    assert cli_main(["lineage", "--db", str(db), "sql", "SELECT * FROM nope"]) == 1
    assert "nope" in capsys.readouterr().err
    assert cli_main(["lineage", "--db", str(tmp_path / "missing.duckdb"), "sql", "SELECT 1"]) == 2
    assert not (tmp_path / "missing.duckdb").exists()
    assert cli_main(["lineage", "--db", str(db), "tables"]) == 0
    assert "v_checkpoint_provenance" in capsys.readouterr().out


# -- the same, as Dagster runs it: four ops of one job in separate step processes ------------------
import dagster as dg  # noqa: E402


@dg.op(config_schema={"db": str, "k": int})
def _lineage_writer_op(context) -> None:
    import time

    barrier = Path(context.op_config["db"]).parent / "barrier"
    barrier.mkdir(exist_ok=True)
    (barrier / str(context.op_config["k"])).touch()
    deadline = time.time() + 120
    while len(list(barrier.iterdir())) < 4:  # all four step processes are alive before anyone writes
        if time.time() > deadline:
            raise TimeoutError("the four writer steps did not run at the same time")
        time.sleep(0.05)
    _writer(context.op_config["db"], context.op_config["k"], 6)


@dg.job(executor_def=dg.multiprocess_executor)
def _four_lineage_writers():
    for k in range(4):
        _lineage_writer_op.alias(f"writer_{k}")()


def test_four_dagster_steps_write_lineage_concurrently(tmp_path):
    from dagster._core.definitions.reconstruct import ReconstructableJob

    db = str(tmp_path / "l.duckdb")
    LineageStore(db)
    run_config = {"ops": {f"writer_{k}": {"config": {"db": db, "k": k}} for k in range(4)},
                  "execution": {"config": {"max_concurrent": 4}}}
    with dg.instance_for_test() as instance:
        result = dg.execute_job(ReconstructableJob.for_file(__file__, "_four_lineage_writers"), instance=instance, run_config=run_config)
        assert result.success
    store = LineageStore(db)
    assert store.count("runs") == 24 and store.count("metrics") == 24 * 5 and store.count("lineage_edges") == 24
