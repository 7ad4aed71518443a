"""Atomic, verified checkpoints, the checkpoint log, and resume from the newest good checkpoint.

Layout under ``run_dir``::

    checkpoints/step-000010/   trainable.safetensors, optimizer.pt, scheduler.pt, rng.pt,
                               teacher.safetensors, state.json, manifest.json
    checkpoints.jsonl          one JSON line per finished checkpoint, appended after the rename

The rules:

* A checkpoint folder exists only once it is complete: its files are written to ``.tmp-*``,
  ``manifest.json`` (the sha256 and size of every other file) last, then the folder is renamed.
* Nothing read from a run folder is unpickled as arbitrary objects: tensors are safetensors, the
  optimizer, scheduler and RNG states go through ``torch.load(weights_only=True)``, the rest is JSON.
* Resume takes the newest folder whose files match its manifest, read back, with finite tensors. A
  damaged one (a hash or size mismatch, a missing, extra or unreadable file, non-finite weights) is
  reported through ``warn``, naming the folder and the file, and the previous one is tried.
* The folders are the record; ``checkpoints.jsonl`` is their index, rebuilt from them on resume
  (a kill between the rename and the append, a deleted or torn log).
* After resuming from step S (0: a fresh start) the run folder holds S's state and nothing later:
  one ``metrics.jsonl`` record per step <= S, no checkpoint of a later step (``trim_run_dir``).
* No checkpoint is written with a non-finite tensor (``NonFiniteCheckpoint``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..data.writers import atomic_write
from ..run_dir import RunDir
from ..wheels import sha256_file
from .sharding import load_optimizer_state, load_trainable_state

MANIFEST = "manifest.json"
REQUIRED = ("state.json", "trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt")
TEACHER = "teacher.safetensors"


class DamagedCheckpoint(RuntimeError):
    """A checkpoint folder that cannot be trusted; the message names the folder, the file and why."""

    def __init__(self, folder: Path, file: str, reason: str):
        self.folder, self.file, self.reason = Path(folder), file, reason
        super().__init__(f"checkpoint {self.folder.name}: {file}: {reason}")


class NonFiniteCheckpoint(RuntimeError):
    """Refused: the state to be saved holds NaN or infinite values."""


class TrainingWarning(UserWarning):
    """What a person should see in a run: a damaged checkpoint skipped, a run folder repaired, a step
    skipped as non-finite."""


# -- files ---------------------------------------------------------------------------------
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
    atomic_write(path, [text])


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace a JSONL log atomically with ``records``."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


# -- the manifest ----------------------------------------------------------------------------
def write_manifest(folder: Path) -> None:
    """``manifest.json``: the sha256 and size of every other file of ``folder`` (written last)."""
    folder = Path(folder)
    files = {f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
             for f in sorted(folder.iterdir()) if f.name != MANIFEST}
    with (folder / MANIFEST).open("w") as fh:
        fh.write(json.dumps({"format": 1, "files": files}, indent=1, sort_keys=True))
        fh.flush()
        os.fsync(fh.fileno())


def _manifest_files(folder: Path) -> dict[str, dict[str, Any]]:
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        raise DamagedCheckpoint(folder, MANIFEST, "missing (an incomplete or foreign folder)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpoint(folder, MANIFEST, f"unreadable ({type(e).__name__}: {e})") from None
    ok = isinstance(files, dict) and all(
        isinstance(n, str) and "/" not in n and "\\" not in n and not n.startswith(".") and isinstance(m, dict)
        and isinstance(m.get("sha256"), str) and isinstance(m.get("bytes"), int) for n, m in files.items())
    if not ok:
        raise DamagedCheckpoint(folder, MANIFEST, "not a manifest of this folder's files")
    return files


def verify_manifest(folder: Path) -> None:
    """Raise ``DamagedCheckpoint`` unless ``folder`` holds exactly the files its manifest lists, each
    with the listed size and sha256."""
    folder = Path(folder)
    files = _manifest_files(folder)
    for name in REQUIRED:
        if name not in files:
            raise DamagedCheckpoint(folder, name, "not in the manifest")
    extra = sorted(f.name for f in folder.iterdir() if f.name != MANIFEST and f.name not in files)
    if extra:
        raise DamagedCheckpoint(folder, extra[0], "not in the manifest (a file added after the save)")
    for name, meta in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            raise DamagedCheckpoint(folder, name, "missing")
        size = _read(folder, name, lambda p: p.stat().st_size)
        if size != meta["bytes"]:
            raise DamagedCheckpoint(folder, name, f"{size} bytes, the manifest says {meta['bytes']} (truncated?)")
        if _read(folder, name, sha256_file) != meta["sha256"]:
            raise DamagedCheckpoint(folder, name, "content hash differs from the manifest (corrupted)")


# -- state -----------------------------------------------------------------------------------
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


def _tensors(obj: Any, prefix: str = "") -> Iterable[tuple[str, torch.Tensor]]:
    """Every floating-point tensor in nested dicts / lists / tuples, with its path."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


def nonfinite_tensors(obj: Any) -> list[str]:
    """The paths of the tensors in ``obj`` that hold a NaN or an infinity."""
    return [name for name, t in _tensors(obj) if not bool(torch.isfinite(t).all())]


def refuse_nonfinite(what: str, **parts: Any) -> None:
    """Raise ``NonFiniteCheckpoint`` naming the tensors of ``parts`` that are not finite."""
    bad = [f"{k}: {n}" for k, v in parts.items() for n in nonfinite_tensors(v)]
    if bad:
        raise NonFiniteCheckpoint(f"{what}: refusing to save non-finite values in {len(bad)} tensor(s), e.g. "
                                  f"{bad[:3]}; the training diverged (lower optim.lr?). Nothing was written.")


# -- saving ----------------------------------------------------------------------------------
def _log_record(folder: Path, state: dict[str, Any]) -> dict[str, Any]:
    return {"step": int(state["step"]), "path": folder.name, "time": state.get("saved_at"),
            **{k: state[k] for k in ("config_hash", "cursor") if k in state}}


def save_checkpoint(run_dir: Path, step: int, *, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                    scheduler: Any, teacher_state: dict[str, torch.Tensor], state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically with its manifest, log it, and prune older ones beyond
    ``keep``: ``weights`` the trainable tensors by name and ``optimizer_state`` AdamW's state, both whole
    (``sharding.trainable_state`` / ``sharding.optimizer_state``). Refuses (``NonFiniteCheckpoint``,
    nothing written) if any weight, teacher or AdamW state tensor is not finite."""
    files = RunDir(run_dir)
    weights = {n: t.detach().cpu().contiguous() for n, t in weights.items()}
    teacher = {k: v.detach().cpu().contiguous() for k, v in teacher_state.items()}
    refuse_nonfinite(f"checkpoint at step {step}", trainable=weights, teacher=teacher,
                     optimizer=optimizer_state["state"])
    root, final = files.checkpoints, files.checkpoint_dir(step)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    save_file(weights, str(tmp / "trainable.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    if teacher:
        save_file(teacher, str(tmp / TEACHER))
    state = {**state, "step": step, "saved_at": time.time()}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    write_manifest(tmp)
    if final.exists():  # a re-run of the same step after a resume: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    append_jsonl(files.checkpoint_log, _log_record(final, state))
    for _, old in files.checkpoint_folders()[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    _remove_unfinished(files)
    return final


def _remove_unfinished(files: RunDir) -> None:
    for stale in files.checkpoints.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


# -- reading ---------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A verified checkpoint, read into memory: nothing is applied to a model until ``restore``."""

    path: Path
    state: dict[str, Any]
    trainable: dict[str, torch.Tensor] = field(repr=False)
    optimizer: dict[str, Any] = field(repr=False)
    scheduler: dict[str, Any] = field(repr=False)
    rng: dict[str, Any] = field(repr=False)
    teacher: dict[str, torch.Tensor] = field(repr=False)

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _read(folder: Path, name: str, reader: Callable[[Path], Any]) -> Any:
    """``reader(folder / name)``; any failure is a ``DamagedCheckpoint`` naming the file."""
    try:
        return reader(folder / name)
    except Exception as e:  # noqa: BLE001 - whatever the parser raises, the file is unreadable
        raise DamagedCheckpoint(folder, name, f"unreadable ({type(e).__name__}: {e})") from None


def _torch_state(path: Path) -> Any:
    # weights_only: a crafted pickle in a run folder is refused, never executed
    return torch.load(path, weights_only=True, map_location="cpu")


def _tensor_file(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _json_state(path: Path) -> dict[str, Any]:
    state = json.loads(path.read_text())
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError("expected a JSON object with an integer 'step'")
    return state


def read_state(folder: Path) -> dict[str, Any]:
    """A checkpoint's ``state.json`` (step, config hash, data cursor, counters)."""
    return _read(Path(folder), "state.json", _json_state)


def read_checkpoint(folder: Path) -> Checkpoint:
    """Verify ``folder`` against its manifest and read every file of it; raises ``DamagedCheckpoint``
    (naming the file) for a mismatch, an unreadable file, a step other than the folder's, or
    non-finite weights."""
    folder = Path(folder)
    verify_manifest(folder)
    state = read_state(folder)
    if folder.name != RunDir.checkpoint_name(state["step"]):
        raise DamagedCheckpoint(folder, "state.json", f"says step {state['step']}, not the folder's")
    ck = Checkpoint(folder, state, trainable=_read(folder, "trainable.safetensors", _tensor_file),
                    optimizer=_read(folder, "optimizer.pt", _torch_state),
                    scheduler=_read(folder, "scheduler.pt", _torch_state), rng=_read(folder, "rng.pt", _torch_state),
                    teacher=_read(folder, TEACHER, _tensor_file) if (folder / TEACHER).exists() else {})
    for name, tensors in (("trainable.safetensors", ck.trainable), (TEACHER, ck.teacher)):
        bad = nonfinite_tensors(tensors)
        if bad:
            raise DamagedCheckpoint(folder, name, f"non-finite values in {len(bad)} tensor(s), e.g. {bad[:3]}")
    return ck


def newest_good_checkpoint(run_dir: Path, *, warn: Callable[[str], None]) -> Checkpoint | None:
    """The newest checkpoint folder that verifies and reads back, or None; each damaged one newer
    than it is reported through ``warn`` (folder, file and why) and skipped."""
    for _, folder in reversed(RunDir(run_dir).checkpoint_folders()):
        try:
            return read_checkpoint(folder)
        except DamagedCheckpoint as e:
            warn(f"{e}; skipped, resuming from an earlier checkpoint")
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint folder whose files match its manifest, or None."""
    for _, folder in reversed(RunDir(run_dir).checkpoint_folders()):
        try:
            verify_manifest(folder)
        except DamagedCheckpoint:
            continue
        return folder
    return None


def _copy_weights(weights: dict[str, torch.Tensor], model: Any, where: Path) -> None:
    params = dict(model.named_parameters())
    unknown = set(weights) - set(params)
    if unknown:
        raise KeyError(f"checkpoint {where} holds parameters the model lacks: {sorted(unknown)[:5]}")
    missing = {n for n, p in params.items() if p.requires_grad} - set(weights)
    if missing:
        raise KeyError(f"checkpoint {where} lacks trainable parameters of the model: {sorted(missing)[:5]}")
    load_trainable_state(model, weights)


def load_trainable(path: Path, model: Any) -> None:
    """Copy a checkpoint's trainable weights (``trainable.safetensors``) into ``model`` in place, after
    verifying the folder against its manifest."""
    path = Path(path)
    verify_manifest(path)
    _copy_weights(_read(path, "trainable.safetensors", _tensor_file), model, path)


def restore(ck: Checkpoint, *, model: Any, optimizer: Any, scheduler: Any) -> None:
    """Apply a read checkpoint: weights, optimizer, scheduler and RNG (the teacher's state is the caller's)."""
    _copy_weights(ck.trainable, model, ck.path)
    load_optimizer_state(model, optimizer, ck.optimizer)
    scheduler.load_state_dict(ck.scheduler)
    set_rng_state(ck.rng)


def load_checkpoint(path: Path, *, model: Any, optimizer: Any, scheduler: Any) -> tuple[dict[str, Any], dict]:
    """Verify, read and restore one checkpoint; returns (state.json, teacher state)."""
    ck = read_checkpoint(path)
    restore(ck, model=model, optimizer=optimizer, scheduler=scheduler)
    return ck.state, ck.teacher


# -- the run folder after a resume -------------------------------------------------------------
def trim_run_dir(run_dir: Path, step: int, *, log: Callable[[str], None], warn: Callable[[str], None],
                 verified: Path | None = None) -> None:
    """Make the run folder hold the state of ``step`` (the checkpoint resumed from; 0: a fresh start)
    and nothing later: ``metrics.jsonl`` rewritten to the last record of each step <= ``step`` (a torn
    line and the records of lost steps dropped), checkpoint folders of later steps and unfinished
    ``.tmp-*`` folders removed, ``checkpoints.jsonl`` rebuilt from the folders (``verified``: a folder
    already checked)."""
    files = RunDir(run_dir)
    _trim_metrics(files, step, log)
    for s, folder in files.checkpoint_folders():
        if s > step:
            warn(f"checkpoint {folder.name} is newer than the state resumed from (step {step}): removed")
            shutil.rmtree(folder, ignore_errors=True)
    _remove_unfinished(files)
    _rebuild_checkpoint_log(files, step, warn=warn, verified=verified)


def _trim_metrics(files: RunDir, step: int, log: Callable[[str], None]) -> None:
    lines = [ln for ln in files.metrics.read_text().splitlines() if ln.strip()] if files.metrics.exists() else []
    kept = [m for m in files.metric_records() if m["step"] <= step]
    if lines:
        write_jsonl(files.metrics, kept)
    if len(lines) != len(kept):
        log(f"[opsdl] metrics.jsonl: {len(lines) - len(kept)} line(s) dropped (torn, repeated, or of steps after "
            f"step {step}); {len(kept)} kept")


def _rebuild_checkpoint_log(files: RunDir, step: int, *, warn: Callable[[str], None],
                            verified: Path | None) -> None:
    """``checkpoints.jsonl`` as the folders on disk say (each verified), plus the logged records of
    folders pruned since (their history), for steps <= ``step``; rewritten only if it says otherwise."""
    logged = files.checkpoint_records()
    records = {int(r["step"]): {k: v for k, v in r.items() if k != "dir"} for r in logged
               if isinstance(r.get("step"), int) and r["step"] <= step and not r["dir"].exists()}
    for s, folder in files.checkpoint_folders():
        try:
            if folder != verified:
                verify_manifest(folder)
            records[s] = _log_record(folder, read_state(folder))
        except DamagedCheckpoint as e:
            warn(f"{e}; left out of checkpoints.jsonl")
    old = files.checkpoint_log.read_text() if files.checkpoint_log.exists() else None
    new = "".join(json.dumps(records[s], sort_keys=True) + "\n" for s in sorted(records))
    if old == new or (old is None and not records):
        return
    if [(r.get("step"), r["path"]) for r in logged] != [(s, records[s]["path"]) for s in sorted(records)]:
        warn(f"checkpoints.jsonl {'was missing' if old is None else 'did not match checkpoints/'}: rebuilt from "
             f"the checkpoint folders ({len(records)} records)")
    atomic_write_text(files.checkpoint_log, new)
