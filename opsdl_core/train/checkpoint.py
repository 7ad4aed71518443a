"""Atomic checkpoints, an append-only checkpoint log, and "resume from the last complete record".

Layout under ``run_dir``::

    checkpoints/step-000010/   trainable.safetensors, optimizer.pt, scheduler.pt, rng.pt,
                               teacher.safetensors, state.json   (written to .tmp-*, then renamed)
    checkpoints.jsonl          one JSON line per finished checkpoint, appended after the rename

A checkpoint directory exists only once it is complete (rename is atomic), and a log line is
written only after that, so a run killed at any moment resumes from the last line whose
directory is present.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..run_dir import RunDir


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict[str, Any]:
    """Every generator's state in types ``torch.load(weights_only=True)`` reads back (tensors, ints, floats,
    tuples): nothing a run folder holds is unpickled as arbitrary objects on resume."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, step: int, *, model: Any, optimizer: Any, scheduler: Any,
                    teacher_state: dict[str, torch.Tensor], state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically, log it, and prune older ones beyond ``keep``."""
    root = RunDir(run_dir).checkpoints
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    if teacher_state:
        save_file({k: v.cpu().contiguous() for k, v in teacher_state.items()}, str(tmp / "teacher.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "saved_at": time.time()}, indent=1))
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # a re-run of the same step after a resume: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    append_jsonl(RunDir(run_dir).checkpoint_log, {"step": step, "path": final.name, "time": time.time(),
                                           **{k: state[k] for k in ("config_hash", "cursor") if k in state}})
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest logged checkpoint whose directory is complete, or None."""
    for rec in reversed(RunDir(run_dir).checkpoint_records()):
        if (rec["dir"] / "state.json").is_file():
            return rec["dir"]
    return None


def load_trainable(path: Path, model: Any) -> None:
    """Copy a checkpoint's trainable weights (``trainable.safetensors``) into ``model`` in place."""
    path = Path(path)
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    unknown = set(weights) - set(params)
    if unknown:
        raise KeyError(f"checkpoint {path} holds parameters the model lacks: {sorted(unknown)[:5]}")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)


def load_checkpoint(path: Path, *, model: Any, optimizer: Any, scheduler: Any) -> tuple[dict[str, Any], dict]:
    """Restore weights, optimizer, scheduler and RNG; returns (state.json, teacher state)."""
    path = Path(path)
    load_trainable(path, model)
    # weights_only: a crafted pickle in a run folder is refused, never executed
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    teacher = load_file(str(path / "teacher.safetensors")) if (path / "teacher.safetensors").exists() else {}
    return json.loads((path / "state.json").read_text()), teacher
