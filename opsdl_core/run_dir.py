"""A training run's folder: the one place its file names are spelled, and its logs' readers.

    run_dir/
      config.yaml          the run config (RunConfig.to_yaml)
      run.json             what the run is: config hash, data digest, base model and its hash
      metrics.jsonl        one record per optimizer step (loss, KL, timings, ...)
      checkpoints.jsonl    one record per checkpoint written (step, folder, config hash, data cursor)
      checkpoints/         step-NNNNNN/ folders (weights, optimizer, scheduler, RNG, state, manifest.json)
      baseline_data.jsonl  Long-SFT / DPO targets and pairs, built once from the initial weights
      final/               adapter/ (LoRA), model/ (a merged transformers folder), lineage.json
      results.json         the figures the run measured (python -m opsdl_core.train)
      train.log            the process's output when an experiment launched it
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

__all__ = ["RunDir", "read_jsonl"]

_CHECKPOINT_NAME = re.compile(r"step-(\d{6,})")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL log; a torn last line (a crash mid-write) and lines that are not JSON objects
    are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


class RunDir:
    """A run folder by its root; every file of it by name."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @property
    def config(self) -> Path:  # the run config
        return self.root / "config.yaml"

    @property
    def info(self) -> Path:  # what the run is (config hash, data digest, base model)
        return self.root / "run.json"

    @property
    def metrics(self) -> Path:  # one record per optimizer step
        return self.root / "metrics.jsonl"

    @property
    def checkpoint_log(self) -> Path:  # one record per checkpoint written
        return self.root / "checkpoints.jsonl"

    @property
    def checkpoints(self) -> Path:  # the checkpoint folders
        return self.root / "checkpoints"

    @staticmethod
    def checkpoint_name(step: int) -> str:  # a checkpoint folder's name
        return f"step-{int(step):06d}"

    def checkpoint_dir(self, step: int) -> Path:  # one checkpoint's folder
        return self.checkpoints / self.checkpoint_name(step)

    def checkpoint_folders(self) -> list[tuple[int, Path]]:
        """``(step, folder)`` of every checkpoint folder on disk, by step (unfinished ``.tmp-*`` folders,
        which are never renamed into place, are not among them)."""
        if not self.checkpoints.is_dir():
            return []
        found = ((_CHECKPOINT_NAME.fullmatch(p.name), p) for p in self.checkpoints.iterdir() if p.is_dir())
        return sorted((int(m.group(1)), p) for m, p in found if m)

    @property
    def baseline_data(self) -> Path:  # Long-SFT / DPO targets and pairs
        return self.root / "baseline_data.jsonl"

    @property
    def final(self) -> Path:  # the final adapter and merged model
        return self.root / "final"

    @property
    def results(self) -> Path:  # the figures the run measured
        return self.root / "results.json"

    @property
    def train_log(self) -> Path:  # the process's output when an experiment launched it
        return self.root / "train.log"

    @property
    def final_model(self) -> Path:  # a merged, standard transformers folder
        return self.final / "model"

    @property
    def final_adapter(self) -> Path:  # the LoRA adapter (LoRA runs)
        return self.final / "adapter"

    def metric_records(self) -> list[dict[str, Any]]:
        """``metrics.jsonl``: the last record of each step, in step order."""
        by_step: dict[int, dict[str, Any]] = {}
        for m in read_jsonl(self.metrics):
            if isinstance(m.get("step"), int):
                by_step[m["step"]] = m
        return [by_step[s] for s in sorted(by_step)]

    def checkpoint_records(self) -> list[dict[str, Any]]:
        """``checkpoints.jsonl``, each record with ``dir``: its checkpoint folder (which keep_checkpoints
        may have pruned since)."""
        return [{**r, "dir": self.checkpoints / str(r["path"])} for r in read_jsonl(self.checkpoint_log)
                if isinstance(r.get("path"), str)]

    def seconds_at_step(self) -> dict[int, float]:
        """Training seconds spent up to the end of each step (the sum of the steps' ``step_s``: rollout,
        scoring, backward and optimizer; not model loading or checkpoint writes)."""
        out, total = {}, 0.0
        for m in self.metric_records():
            if isinstance(m.get("step_s"), (int, float)):
                total += float(m["step_s"])
                out[m["step"]] = round(total, 1)
        return out
