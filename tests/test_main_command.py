"""The README's main command, ``scripts/pipeline.sh``, end to end on a tiny model: the same script,
the Dagster CLI, the instance and the lineage file it sets up, only the model and the sizes differ."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from test_pipeline import TINY_RUN_CONFIG  # noqa: E402  (tests/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_pipeline_script_runs_the_full_job_and_prints_the_report(tiny_model_dir, tmp_path):
    committed = yaml.safe_load((ROOT / "configs" / "pipeline.yaml").read_text())
    cfg = {k: v for k, v in committed.items() if k != "ops"}  # the main job's executor and logger settings
    cfg["ops"] = TINY_RUN_CONFIG
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    home = tmp_path / "home"
    env = {**os.environ, "OPSDL_HOME": str(home), "OPSDL_MODEL": str(tiny_model_dir), "OMP_NUM_THREADS": "1"}
    env.pop("DAGSTER_HOME", None)
    proc = subprocess.run(["scripts/pipeline.sh", str(tmp_path / "tiny.yaml")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (home / "artifacts" / "report" / "report.md").read_text()
    assert report in proc.stdout  # the report is printed
    assert f"lineage DB: {home / 'lineage.duckdb'}" in proc.stdout
    assert (home / "dagster_home" / "dagster.yaml").exists()  # its own instance, never the user's
    from opsdl_core.lineage.store import LineageStore

    store = LineageStore(home / "lineage.duckdb")
    assert store.count("runs", "WHERE kind = 'train'") == 1
    assert store.count("eval_scores", "WHERE task = 'opsdl_ruler_vt'") > 0  # lm-eval's RULER ran too
    assert store.count("runs", "WHERE asset_key = 'method_comparison'") == 0  # the experiment is its own job
