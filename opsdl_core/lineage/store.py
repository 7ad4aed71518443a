"""The DuckDB lineage store: experiments, runs, params, metrics, datasets, checkpoints,
evaluation scores and rollout samples in one file, queryable with SQL.

The schema follows MLflow's tracking model (experiments → runs → params / metric history)
and adds what OPSDL users ask about: datasets identified by content digest, checkpoints by
content hash, evaluation scores by task and context length, and lineage edges
(dataset → run → checkpoint → evaluation).

Concurrency.  DuckDB lets one process open a database file for writing, and a writer blocks
every other process, readers included.  Dagster runs steps in separate processes, so the
store never holds a connection open: every write is one short transaction, writers queue on an
exclusive file lock (``<db>.lock``), and every read opens the file read-only without that lock.
A process that finds the file held by another (a writer, or a user's own DuckDB session beside
the pipeline) waits and retries until ``lock_timeout_s``; then it fails naming the holder, so
a write is either stored or raises, never dropped.  Writes are idempotent upserts on natural
primary keys, so re-materializing an asset replaces its rows instead of duplicating them.
Reads run with DuckDB's external access off (no ``COPY ... TO``, ``EXPORT DATABASE``,
``ATTACH`` or file reads from a query), and opening a store whose schema is current writes
nothing.

Usage::

    store = LineageStore("var/lineage.duckdb")
    with store.transaction() as con:
        con.execute("INSERT ...")
    store.query("SELECT * FROM v_checkpoint_provenance")
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
from filelock import FileLock, Timeout

from ..grading import ERROR_KINDS
from ..run_dir import RunDir
from .schema import _TABLES, _VIEWS, SCHEMA_VERSION

__all__ = [
    "LineageStore",
    "LineageLockTimeout",
    "default_db_path",
    "content_hash",
    "flatten_params",
    "ingest_training_run",
    "SCHEMA_VERSION",
]

_SCHEMA_DIGEST = hashlib.sha256((_TABLES + _VIEWS).encode()).hexdigest()[:16]
_HELD = re.compile(r"Conflicting lock is held in (?P<holder>.+?\(PID \d+\))")


class LineageLockTimeout(TimeoutError):
    """The lineage file stayed held by another process for longer than the store waits."""


def _is_lock_conflict(err: BaseException) -> bool:
    return isinstance(err, duckdb.IOException) and "lock" in str(err).lower()


def _connect(path: Path, *, read_only: bool, deadline: float) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection to ``path``, retried with jittered backoff while another process holds
    the file; past ``deadline`` a ``LineageLockTimeout`` naming the holder."""
    config = {"enable_external_access": False, "lock_configuration": True} if read_only else {}
    delay, start = 0.005, time.monotonic()
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=config)
        except duckdb.IOException as err:
            if not _is_lock_conflict(err):
                raise
            if time.monotonic() + delay > deadline:
                held = _HELD.search(str(err))
                holder = held.group("holder").strip() if held else "another process"
                raise LineageLockTimeout(
                    f"lineage store {path}: could not open it {'read-only' if read_only else 'for writing'} for "
                    f"{time.monotonic() - start:.1f} s: the file is held by {holder}; close that DuckDB session "
                    f"(a read-only one blocks writers too) or raise lock_timeout_s") from err
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.25)


def default_db_path() -> Path:
    """``$OPSDL_LINEAGE_DB``, else ``$OPSDL_HOME/lineage.duckdb``, else ``var/lineage.duckdb``."""
    if os.environ.get("OPSDL_LINEAGE_DB"):
        return Path(os.environ["OPSDL_LINEAGE_DB"])
    return Path(os.environ.get("OPSDL_HOME", "var")) / "lineage.duckdb"


def content_hash(path: str | Path) -> str:
    """sha256 (hex) over a file, or over a folder's files (relative names and bytes, sorted)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    if not files:
        raise FileNotFoundError(f"nothing to hash at {p}")
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def flatten_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"optim": {"lr": 1e-4}} -> {"optim.lr": "0.0001"}``; lists as JSON."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_params(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(list(v))
        else:
            out[key] = "null" if v is None else str(v)
    return out


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _ts(x: float | datetime | None) -> datetime | None:
    if x is None or isinstance(x, datetime):
        return x
    return datetime.fromtimestamp(float(x), timezone.utc).replace(tzinfo=None)


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


@dataclass
class LineageStore:
    """One DuckDB file; short-lived connections serialized by a file lock across processes."""

    path: Path
    lock_timeout_s: float = 600.0

    def __init__(self, path: str | Path | None = None, *, lock_timeout_s: float = 600.0, read_only: bool = False):
        """``read_only``: never write, not even the schema (``opsdl lineage sql``); the file must exist."""
        self.path = Path(path) if path is not None else default_db_path()
        self.lock_timeout_s = lock_timeout_s
        self.read_only = read_only
        self._lock = FileLock(str(self.path) + ".lock", timeout=lock_timeout_s)
        if read_only:
            if not self.path.is_file():
                raise FileNotFoundError(f"no lineage database at {self.path}")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._schema_current():
            self._migrate()

    def _schema_current(self) -> bool:
        """Whether the file exists with this code's tables and views (then opening writes nothing)."""
        if not self.path.is_file():
            return False
        try:
            with self.reader() as con:
                version = con.execute("SELECT max(version) FROM schema_info").fetchone()[0]
                digest = con.execute("SELECT max(digest) FROM schema_digest").fetchone()[0]
        except duckdb.CatalogException:  # an older file (no schema_digest) or an empty one
            return False
        if version is not None and version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} has lineage schema v{version}; this opsdl knows v{SCHEMA_VERSION}")
        return version == SCHEMA_VERSION and digest == _SCHEMA_DIGEST

    def _migrate(self) -> None:
        with self.transaction() as con:
            con.execute(_TABLES)
            row = con.execute("SELECT max(version) FROM schema_info").fetchone()
            if row[0] is None:
                con.execute("INSERT INTO schema_info VALUES (?)", [SCHEMA_VERSION])
            elif row[0] > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has lineage schema v{row[0]}; this opsdl knows v{SCHEMA_VERSION}")
            elif row[0] < SCHEMA_VERSION:  # the ALTERs above migrated it
                con.execute("UPDATE schema_info SET version = ?", [SCHEMA_VERSION])
            con.execute(_VIEWS)
            con.execute("DELETE FROM schema_digest")
            con.execute("INSERT INTO schema_digest VALUES (?)", [_SCHEMA_DIGEST])

    # -- connections ---------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """An exclusive read-write connection; commits on success, rolls back on error."""
        if self.read_only:
            raise PermissionError(f"lineage store {self.path} was opened read-only")
        deadline = time.monotonic() + self.lock_timeout_s
        try:
            self._lock.acquire(timeout=self.lock_timeout_s)
        except Timeout as err:
            raise LineageLockTimeout(f"lineage store {self.path}: another writer of this store held {self._lock.lock_file} "
                                     f"for {self.lock_timeout_s:.0f} s") from err
        try:
            con = _connect(self.path, read_only=False, deadline=deadline)
            try:
                con.execute("BEGIN TRANSACTION")
                try:
                    yield con
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
            finally:
                con.close()
        finally:
            self._lock.release()

    @contextmanager
    def reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection with external access off; waits only while a write holds the file."""
        con = _connect(self.path, read_only=True, deadline=time.monotonic() + self.lock_timeout_s)
        try:
            yield con
        finally:
            con.close()

    def query(self, sql: str, params: Sequence[Any] | None = None) -> tuple[list[str], list[tuple]]:
        """Run read-only SQL; returns ``(column names, rows)``."""
        with self.reader() as con:
            cur = con.execute(sql, params or [])
            cols = [d[0] for d in cur.description] if cur.description else []
            return cols, cur.fetchall()

    def count(self, table: str, where: str = "", params: Sequence[Any] | None = None) -> int:
        """Rows of one of the store's tables or views (``where``: a SQL ``WHERE`` clause with ``?``
        placeholders bound to ``params``)."""
        if table not in self.tables():
            raise ValueError(f"unknown table {table!r}; expected one of {sorted(self.tables())}")
        _, rows = self.query(f"SELECT count(*) FROM {table} {where}", params)
        return int(rows[0][0])

    def tables(self) -> set[str]:
        """Names of the tables and views in the store."""
        return {r[0] for r in self.query("SELECT table_name FROM information_schema.tables")[1]}

    # -- writes (idempotent upserts) -----------------------------------------------------------
    def log_experiment(self, name: str, description: str | None = None) -> str:
        exp_id = hashlib.sha256(name.encode()).hexdigest()[:16]
        with self.transaction() as con:
            con.execute(
                "INSERT INTO experiments VALUES (?, ?, ?, ?) ON CONFLICT (experiment_id) DO UPDATE SET "
                "description = coalesce(excluded.description, experiments.description)",
                [exp_id, name, description, _now()])
        return exp_id

    def log_run(self, run_id: str, *, experiment: str = "default", kind: str, status: str = "finished",
                params: dict[str, Any] | None = None, started_at: float | datetime | None = None,
                ended_at: float | datetime | None = None, timings: dict[str, float] | None = None,
                **fields: Any) -> str:
        """Insert or replace a run and its params (the old params of that run are replaced)."""
        allowed = {"name", "dagster_run_id", "asset_key", "partition_key", "config_hash", "code_version",
                   "base_model", "base_model_hash", "run_dir", "duration_s"}
        unknown = set(fields) - allowed
        if unknown:
            raise TypeError(f"log_run got unknown fields {sorted(unknown)}; allowed: {sorted(allowed)}")
        exp_id = self.log_experiment(experiment)
        st, en = _ts(started_at), _ts(ended_at)
        duration = fields.pop("duration_s", None)
        if duration is None and st is not None and en is not None:
            duration = (en - st).total_seconds()
        row = {"run_id": run_id, "experiment_id": exp_id, "kind": kind, "status": status,
               "started_at": st, "ended_at": en, "duration_s": duration,
               "timings": json.dumps(timings) if timings is not None else None, **fields}
        cols = list(row)
        with self.transaction() as con:
            con.execute(f"INSERT OR REPLACE INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                        [row[c] for c in cols])
            if params is not None:
                con.execute("DELETE FROM params WHERE run_id = ?", [run_id])
                flat = flatten_params(params)
                if flat:
                    con.executemany("INSERT INTO params VALUES (?, ?, ?)", [[run_id, k, v] for k, v in flat.items()])
        return run_id

    def log_metrics(self, run_id: str, rows: Iterable[dict[str, Any]], *, step_key: str = "step",
                    time_key: str | None = "time") -> int:
        """Metric history: one dict per step; every numeric field becomes ``(key, step, value)``."""
        records = []
        for i, r in enumerate(rows):
            step = int(r.get(step_key, i))
            ts = _ts(r.get(time_key)) if time_key else None
            for k, v in r.items():
                if k in (step_key, time_key) or isinstance(v, (bool, str)) or v is None:
                    continue
                if isinstance(v, (int, float)):
                    records.append([run_id, k, step, _finite(v), ts or _now()])
        with self.transaction() as con:
            if records:
                con.executemany("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?, ?)", records)
        return len(records)

    def log_dataset(self, digest: str, *, name: str, kind: str, path: str | None = None,
                    n_rows: int | None = None, metadata: dict[str, Any] | None = None) -> str:
        with self.transaction() as con:
            con.execute(
                "INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO UPDATE SET "
                "name = excluded.name, kind = excluded.kind, path = excluded.path, n_rows = excluded.n_rows, "
                "metadata = excluded.metadata",
                [digest, name, kind, path, n_rows, _now(), json.dumps(metadata or {})])
        return digest

    def log_edge(self, src: tuple[str, str], dst: tuple[str, str], relation: str, run_id: str | None = None) -> None:
        self.log_edges([(src, dst, relation)], run_id=run_id)

    def log_edges(self, edges: Iterable[tuple[tuple[str, str], tuple[str, str], str]], run_id: str | None = None) -> None:
        rows = [[s[0], s[1], d[0], d[1], rel, run_id] for s, d, rel in edges]
        with self.transaction() as con:
            if rows:
                con.executemany("INSERT OR REPLACE INTO lineage_edges VALUES (?, ?, ?, ?, ?, ?)", rows)

    def log_checkpoint(self, run_id: str, path: str | Path, *, kind: str, step: int | None = None,
                       checkpoint_id: str | None = None) -> str:
        cid = checkpoint_id or content_hash(path)
        with self.transaction() as con:
            con.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)",
                        [cid, run_id, step, kind, str(path), _now()])
            con.execute("INSERT OR REPLACE INTO lineage_edges VALUES ('run', ?, 'checkpoint', ?, 'output', ?)",
                        [run_id, cid, run_id])
        return cid

    def log_eval_scores(self, run_id: str, checkpoint_id: str, scores: Iterable[dict[str, Any]],
                        dataset_digest: str | None = None) -> int:
        """``scores``: dicts with task, context, metric, value and optional context_length, n,
        stderr, harness, task_config_hash, dataset_digest, and ``answers`` (one dict per question:
        ``id``, ``correct`` and optional ``output`` and ``error``, a wrong answer's kind as
        ``synthetic.error_kind`` gives it; table ``eval_answers``, view ``v_answer_changes``)."""
        rows, answers = [], []
        for i, s in enumerate(scores):
            for f in ("task", "context", "metric", "value"):
                if f not in s:
                    raise ValueError(f"eval score #{i}: missing field {f!r}; expected task, context, metric, value")
            key = [run_id, checkpoint_id, s["task"], s["context"], int(s.get("context_length", 0)), s["metric"]]
            digest = s.get("dataset_digest", dataset_digest)
            rows.append([*key, _finite(s["value"]), s.get("n"), digest,
                         _finite(s.get("stderr")), s.get("harness"), s.get("task_config_hash")])
            for j, a in enumerate(s.get("answers") or []):
                if "id" not in a or not isinstance(a.get("correct"), bool):
                    raise ValueError(f"eval score #{i} ({s['task']}), answer #{j}: expected an 'id' and a boolean "
                                     f"'correct', got keys {sorted(a)}")
                err = a.get("error")
                if err is not None and (a["correct"] or err not in ERROR_KINDS):
                    raise ValueError(f"eval score #{i} ({s['task']}), answer #{j} ({a['id']}): 'error' {err!r}: "
                                     f"expected null for a right answer, else one of {list(ERROR_KINDS)}")
                answers.append([*key, str(a["id"]), digest, a.get("output"), a["correct"], err])
        with self.transaction() as con:
            if rows:
                con.executemany(
                    "INSERT OR REPLACE INTO eval_scores (run_id, checkpoint_id, task, context, context_length, "
                    "metric, value, n, dataset_digest, stderr, harness, task_config_hash) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            if answers:
                con.executemany("INSERT OR REPLACE INTO eval_answers (run_id, checkpoint_id, task, context, "
                                "context_length, metric, example_id, dataset_digest, output, correct, error) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", answers)
            con.execute("INSERT OR REPLACE INTO lineage_edges VALUES ('checkpoint', ?, 'run', ?, 'evaluated', ?)",
                        [checkpoint_id, run_id, run_id])
            if dataset_digest:
                con.execute("INSERT OR REPLACE INTO lineage_edges VALUES ('dataset', ?, 'run', ?, 'input', ?)",
                            [dataset_digest, run_id, run_id])
        return len(rows)

    def log_rollout_samples(self, run_id: str, samples: Iterable[dict[str, Any]]) -> int:
        """``samples``: snapshot rows (``snapshot.rollout_snapshot``); the per-token lists
        (``token_ids``, ``tokens``, ``student_token_logprobs``, ``teacher_token_logprobs``) are
        optional and must have one entry per response token."""
        cols = ["run_id", "example_id", "sample_index", "step", "dataset_digest", "response", "n_tokens",
                "finish_reason", "student_logprob", "teacher_logprob", "correct", "token_ids", "tokens",
                "student_token_logprobs", "teacher_token_logprobs"]
        samples = list(samples)
        for i, smp in enumerate(samples):
            lens = {c: len(smp[c]) for c in cols[-4:] if smp.get(c) is not None}
            if len(set(lens.values())) > 1:
                raise ValueError(f"rollout sample #{i} ({smp.get('example_id')}): per-token lists differ in length "
                                 f"{lens}; expected one entry per response token")
        rows = [[run_id] + [smp.get(c) for c in cols[1:]] for smp in samples]
        with self.transaction() as con:
            if rows:
                con.executemany(f"INSERT OR REPLACE INTO rollout_samples ({', '.join(cols)}) "
                                f"VALUES ({', '.join('?' * len(cols))})", rows)
        return len(rows)


def ingest_training_run(store: LineageStore, run_dir: str | Path, *, run_id: str | None = None,
                        experiment: str = "default", input_datasets: Sequence[str] = (),
                        code_version: str | None = None, **run_fields: Any) -> dict[str, Any]:
    """Record a finished ``python -m opsdl_core.train`` run folder: the run, its config as params, the metric
    history, every checkpoint in ``checkpoints.jsonl`` and the final adapter/model, with edges
    from the input datasets and the base model.  Returns ids of what was written."""
    import yaml

    files = RunDir(run_dir)
    rd = files.root
    info = json.loads(files.info.read_text())
    cfg = yaml.safe_load(files.config.read_text()) if files.config.exists() else {}
    rid = run_id or f"train-{info['config_hash']}-{info.get('data_digest', '')}"
    metrics = files.metric_records()
    finished = files.final.exists()
    timings: dict[str, float] = {}
    for m in metrics:
        for k, v in m.items():
            if k.endswith("_s") and isinstance(v, (int, float)):
                timings[k] = timings.get(k, 0.0) + float(v)
    started = files.info.stat().st_mtime
    ended = files.final.stat().st_mtime if finished else None
    store.log_run(rid, experiment=experiment, kind="train", status="finished" if finished else "failed",
                  params=cfg, started_at=started, ended_at=ended, timings=timings or None,
                  config_hash=info.get("config_hash"), base_model=info.get("model"),
                  base_model_hash=info.get("model_hash"), run_dir=str(rd), code_version=code_version, **run_fields)
    store.log_metrics(rid, metrics)
    edges = [(("dataset", d), ("run", rid), "input") for d in input_datasets]
    if info.get("data_digest"):
        edges.append((("dataset", info["data_digest"]), ("run", rid), "input"))
    if info.get("model_hash"):
        edges.append((("model", info["model_hash"]), ("run", rid), "base_model"))
    store.log_edges(edges, run_id=rid)
    ckpts = [store.log_checkpoint(rid, rec["dir"], kind="full-state", step=rec.get("step"))
             for rec in files.checkpoint_records() if rec["dir"].exists()]  # older ones pruned by keep_checkpoints
    final: dict[str, str] = {}
    steps = info.get("steps") or (metrics[-1]["step"] if metrics else None)
    for p, kind in ((files.final_adapter, "adapter"), (files.final_model, "merged")):
        if p.exists():
            final[kind] = store.log_checkpoint(rid, p, kind=kind, step=steps)
    return {"run_id": rid, "checkpoints": ckpts, "final": final, "metrics": len(metrics),
            "time": time.time()}
