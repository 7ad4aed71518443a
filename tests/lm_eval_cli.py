"""Run the lm_eval CLI in a child process, offline, and return its results JSON (shared by the
retention tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_lm_eval(args: list[str], out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "lm_eval", "--device", "cpu", "--batch_size", "1", "--output_path", str(out),
           "--log_samples", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = list(out.rglob("results_*.json"))
    return json.loads(results_file.read_text())
