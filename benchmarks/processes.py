"""Fresh processes for the benchmarks' contenders (``bench_eval.py``, ``bench_vs_trl.py``): the script runs
itself with ``--child NAME`` and the same options, and the child prints one ``RESULT {json}`` line."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def run_child(script: str, name: str, args: Any, *, parent_only: tuple[str, ...] = ("child", "rounds", "contenders")
              ) -> dict | None:
    """Run ``script --child name`` with every option of ``args`` but ``parent_only``; the child's result, or None
    after printing the end of its output to stderr when it failed."""
    cmd = [sys.executable, script, "--child", name] + [
        x for k, v in vars(args).items() if k not in parent_only for x in (f"--{k.replace('_', '-')}", str(v))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        print(f"{name} failed (exit {proc.returncode}):\n" + proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
        return None
    return json.loads(line[len("RESULT "):])
