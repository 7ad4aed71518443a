"""Resume safety on a tiny model: a kill at every phase of a step resumes to the uninterrupted run's
weights with one metrics line per step; damaged checkpoints are skipped for the previous good one,
loudly; a crafted pickle in a run folder never runs; non-finite losses, gradients and weights never
reach a checkpoint; non-finite config values are refused."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_trainer import make_trainer, tiny_cfg, trainable  # noqa: E402  (tests/ is on sys.path)

from opsdl_core.config import ConfigError, RunConfig
from opsdl_core.config_schema import parse_overrides
from opsdl_core.run_dir import RunDir, read_jsonl
from opsdl_core.train import checkpoint as ckpt
from opsdl_core.train import final as final_mod
from opsdl_core.train import recipe as trainer_mod

STEPS = 4  # checkpoints at 2 and 4 (save_every 2), both kept


def cfg(run_dir, **train):
    return tiny_cfg(run_dir, train={"steps": STEPS, "save_every": 2, "keep_checkpoints": 3, **train})


class Killed(BaseException):
    """A simulated kill: nothing in the trainer catches it."""


def _adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(RunDir(run_dir).final_adapter / "adapter_model.safetensors"))


def _complete(run_dir, lines=None):
    """A fresh trainer on ``run_dir``, resumed, trained to the end and saved: the rerun after a kill."""
    tr = make_trainer(cfg(run_dir), quiet=lines is None)
    if lines is not None:
        tr.log = lines.append
    tr.setup()
    tr.train()
    tr.save_final()
    return tr


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its final adapter and its metrics' losses."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    _complete(run_dir)
    return {"adapter": _adapter(run_dir), "losses": [m["loss"] for m in read_jsonl(RunDir(run_dir).metrics)]}


def assert_same_run(run_dir, reference):
    """The same final weights as the uninterrupted run, exactly one metrics line per step 1..STEPS with
    its losses, the checkpoints listed once each, nothing unfinished left behind."""
    files = RunDir(run_dir)
    a, b = reference["adapter"], _adapter(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = files.metrics.read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in metrics] == reference["losses"]
    assert [r["step"] for r in read_jsonl(files.checkpoint_log)] == [2, 4]
    assert [s for s, _ in files.checkpoint_folders()] == [2, 4]
    assert not list(files.checkpoints.glob(".tmp-*")) and not (files.root / ".tmp-final").exists()


# -- kills -----------------------------------------------------------------------------------
def _raise_at_call(n, real=None, when=lambda *a, **k: True):
    """A stand-in that calls ``real`` but raises ``Killed`` on its ``n``-th matching call."""
    seen = []

    def fake(*a, **k):
        if when(*a, **k):
            seen.append(1)
            if len(seen) == n:
                raise Killed
        return real(*a, **k) if real else None

    return fake


def _kill_in_step(step):
    """Killed inside step ``step``: after its backward, before its optimizer step."""
    def arm(mp, tr):
        real = tr._optimizer_step

        def fake(*a):
            if tr.step == step - 1:
                raise Killed
            return real(*a)

        mp.setattr(tr, "_optimizer_step", fake)
    return arm


def _kill_in_checkpoint_log(mp, tr):
    mp.setattr(ckpt, "append_jsonl", _raise_at_call(2, ckpt.append_jsonl,
                                                    when=lambda path, rec: path.name == "checkpoints.jsonl"))


PHASES = {  # name -> arm(monkeypatch, trainer): the kill; what the folder holds right after it
    "in step 2, before the first checkpoint": _kill_in_step(2),
    "after step 2's metrics, before its checkpoint": lambda mp, tr: mp.setattr(
        ckpt, "save_checkpoint", _raise_at_call(1)),
    "mid-checkpoint at step 4 (its .tmp folder left)": lambda mp, tr: mp.setattr(
        ckpt, "write_manifest", _raise_at_call(2, ckpt.write_manifest)),
    "after checkpoint 4's rename, before its log line": _kill_in_checkpoint_log,
    "in step 3, after a checkpoint": _kill_in_step(3),
    "while writing final/": lambda mp, tr: mp.setattr(
        final_mod, "canonical_adapter_config", _raise_at_call(1)),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_kill_at_any_phase_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch, reference, phase):
    run_dir = tmp_path / "run"
    tr = make_trainer(cfg(run_dir)).setup()
    with monkeypatch.context() as mp:
        PHASES[phase](mp, tr)
        with pytest.raises(Killed):
            tr.train()
            tr.save_final()
    files = RunDir(run_dir)
    if phase.startswith("mid-checkpoint"):
        assert list(files.checkpoints.glob(".tmp-step-000004-*"))
    if phase.startswith("after checkpoint 4"):
        assert files.checkpoint_dir(4).is_dir() and [r["step"] for r in read_jsonl(files.checkpoint_log)] == [2]
    if phase.startswith("while writing"):
        assert (run_dir / ".tmp-final").is_dir() and not files.final.exists()
    _complete(run_dir)
    assert_same_run(run_dir, reference)


def test_a_torn_metrics_line_and_a_deleted_checkpoint_log_are_recovered(tmp_path, reference):
    run_dir = tmp_path / "run"
    files = RunDir(run_dir)
    make_trainer(cfg(run_dir)).setup().train(stop_after=3)  # checkpoint 2; step 3 lost
    files.checkpoint_log.unlink()
    with files.metrics.open("a") as f:
        f.write('{"step": 4, "loss": 0.1')  # cut mid-line
    lines = []
    with pytest.warns(ckpt.TrainingWarning, match="checkpoints.jsonl was missing"):
        tr = _complete(run_dir, lines)
    assert tr.resumed_from == 2
    assert any("metrics.jsonl: 2 line(s) dropped" in line for line in lines)
    assert_same_run(run_dir, reference)


# -- damaged checkpoints -----------------------------------------------------------------------
def _flip_bytes(path, n=64):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def _nan_weights_with_a_matching_manifest(folder):
    weights = load_file(str(folder / "trainable.safetensors"))
    save_file({k: torch.full_like(v, math.nan) for k, v in weights.items()}, str(folder / "trainable.safetensors"))
    ckpt.write_manifest(folder)  # the hashes now agree: only the finite check can tell


DAMAGE = {  # name -> (damage(folder), the file the warning names, what it says)
    "64 flipped bytes in the weights": (lambda d: _flip_bytes(d / "trainable.safetensors"),
                                        "trainable.safetensors", "content hash differs"),
    "a deleted optimizer state": (lambda d: (d / "optimizer.pt").unlink(), "optimizer.pt", "missing"),
    "a truncated state.json": (lambda d: (d / "state.json").write_text((d / "state.json").read_text()[:20]),
                               "state.json", "bytes, the manifest says"),
    "no manifest": (lambda d: (d / "manifest.json").unlink(), "manifest.json", "missing"),
    "a file added": (lambda d: (d / "extra.pt").write_bytes(b"x"), "extra.pt", "not in the manifest"),
    "NaN weights, manifest rewritten": (_nan_weights_with_a_matching_manifest, "trainable.safetensors",
                                        "non-finite"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_skipped_loudly_for_the_previous_good_one(tmp_path, reference, damage):
    run_dir = tmp_path / "run"
    files = RunDir(run_dir)
    make_trainer(cfg(run_dir)).setup().train()  # checkpoints 2 and 4, metrics 1..4
    hurt, name, why = DAMAGE[damage]
    hurt(files.checkpoint_dir(4))
    lines = []
    with pytest.warns(ckpt.TrainingWarning, match=f"checkpoint step-000004: {name}: .*{why}"):
        tr = _complete(run_dir, lines)
    assert tr.resumed_from == 2
    warned = [line for line in lines if "WARNING" in line]
    assert any("step-000004" in line and name in line and "skipped" in line for line in warned), lines
    assert_same_run(run_dir, reference)


def test_with_every_checkpoint_damaged_the_run_starts_over_and_says_so(tmp_path, reference):
    run_dir = tmp_path / "run"
    files = RunDir(run_dir)
    make_trainer(cfg(run_dir)).setup().train(stop_after=3)
    _flip_bytes(files.checkpoint_dir(2) / "trainable.safetensors")
    with pytest.warns(ckpt.TrainingWarning, match="step-000002: trainable.safetensors"):
        tr = _complete(run_dir)
    assert tr.resumed_from is None
    assert_same_run(run_dir, reference)


# -- a crafted pickle --------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs code: it creates the file ``target`` (what a crafted rng.pt would do)."""

    target = ""

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Payload.target),))


@pytest.mark.parametrize("name", ["rng.pt", "optimizer.pt", "scheduler.pt", "trainable.safetensors",
                                  "teacher.safetensors"])
@pytest.mark.parametrize("manifest", ["left", "rewritten to match"])
def test_a_crafted_pickle_in_a_checkpoint_is_never_run(tmp_path, name, manifest):
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    files = RunDir(run_dir)
    sections = {"train": {"teacher": "ema"}}  # a teacher.safetensors too
    make_trainer(tiny_cfg(run_dir, **sections)).setup().train(stop_after=3)
    folder = files.checkpoint_dir(2)
    _Payload.target = str(marker)
    torch.save({"python": _Payload(), "state": _Payload()}, folder / name)
    if manifest != "left":
        ckpt.write_manifest(folder)
    why = "unreadable" if manifest != "left" else "manifest"
    with pytest.raises(ckpt.DamagedCheckpoint, match=f"step-000002: {name}: .*{why}"):
        ckpt.read_checkpoint(folder)
    with pytest.warns(ckpt.TrainingWarning, match=f"step-000002: {name}"):
        tr = make_trainer(tiny_cfg(run_dir, **sections)).setup()
    assert tr.resumed_from is None and tr.step == 0
    assert not marker.exists(), "the payload must never run"


def test_weights_only_refuses_the_payload_itself(tmp_path):
    """The last line of defence, without the manifest: ``torch.load(weights_only=True)`` as the reader uses it."""
    _Payload.target = str(tmp_path / "pwned")
    torch.save({"python": _Payload()}, tmp_path / "rng.pt")
    with pytest.raises(pickle.UnpicklingError):
        ckpt._torch_state(tmp_path / "rng.pt")
    assert not (tmp_path / "pwned").exists()


# -- non-finite values -------------------------------------------------------------------------
def _nan_loss_at(monkeypatch, tr, steps):
    """The loss of the steps ``steps`` (1-based) is NaN (its gradients too)."""
    real = trainer_mod.compute_loss

    def fake(kind, **kw):
        out = real(kind, **kw)
        if tr.step + 1 in steps:
            out.loss = out.loss * math.nan
        return out

    monkeypatch.setattr(trainer_mod, "compute_loss", fake)


def test_a_nan_loss_at_a_save_step_skips_the_update_and_saves_finite_weights(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    tr = make_trainer(cfg(run_dir)).setup()
    _nan_loss_at(monkeypatch, tr, {2})
    after = {}
    lines = []
    tr.log = lines.append
    with pytest.warns(ckpt.TrainingWarning, match="step 2: non-finite loss"):
        tr.train(on_step=lambda m: after.setdefault(m["step"], trainable(tr)))
    m = {r["step"]: r for r in read_jsonl(RunDir(run_dir).metrics)}
    assert [m[s]["skipped_nonfinite"] for s in (1, 2, 3, 4)] == [0, 1, 0, 0]
    assert [m[s]["nonfinite_steps"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert math.isnan(m[2]["loss"]) and any("step 2/4 SKIPPED" in line for line in lines)
    assert all(torch.equal(after[1][n], after[2][n]) for n in after[1])  # no update at step 2
    assert any(not torch.equal(after[2][n], after[3][n]) for n in after[2])  # step 3 trains again
    saved = ckpt.read_checkpoint(RunDir(run_dir).checkpoint_dir(2))
    assert all(torch.equal(saved.trainable[n], after[1][n]) for n in after[1])
    assert {int(s["step"]) for s in saved.optimizer["state"].values()} == {1}  # AdamW stepped once
    assert saved.scheduler["last_epoch"] == 2 and saved.state["nonfinite_steps"] == 1


def test_a_skipped_step_resumes_deterministically(tmp_path, monkeypatch):
    full = make_trainer(cfg(tmp_path / "a")).setup()
    _nan_loss_at(monkeypatch, full, {2, 3})
    with pytest.warns(ckpt.TrainingWarning):
        full.train()
    part = make_trainer(cfg(tmp_path / "b")).setup()
    _nan_loss_at(monkeypatch, part, {2, 3})
    with pytest.warns(ckpt.TrainingWarning):
        part.train(stop_after=3)  # checkpoint 2 (after a skipped step), step 3 (skipped) lost
    resumed = make_trainer(cfg(tmp_path / "b")).setup()
    _nan_loss_at(monkeypatch, resumed, {2, 3})
    assert (resumed.resumed_from, resumed.nonfinite.total, resumed.nonfinite.run) == (2, 1, 1)
    with pytest.warns(ckpt.TrainingWarning, match="step 3: .*2 in a row"):
        resumed.train()
    a, b = trainable(full), trainable(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    ma, mb = (read_jsonl(RunDir(tmp_path / d).metrics) for d in "ab")
    assert [(m["step"], m["skipped_nonfinite"], m["nonfinite_steps"]) for m in ma] == \
        [(m["step"], m["skipped_nonfinite"], m["nonfinite_steps"]) for m in mb] == \
        [(1, 0, 0), (2, 1, 1), (3, 1, 2), (4, 0, 2)]


def test_an_infinite_gradient_with_a_finite_loss_is_skipped_too(tmp_path):
    tr = make_trainer(cfg(tmp_path / "run")).setup()
    before = trainable(tr)
    p = next(p for p in tr.unwrapped.parameters() if p.requires_grad)
    hook = p.register_hook(lambda g: g * math.inf)
    with pytest.warns(ckpt.TrainingWarning, match="non-finite"):
        m = tr.train_step()
    hook.remove()
    assert m["skipped_nonfinite"] == 1 and math.isfinite(m["loss"]) and not math.isfinite(m["grad_norm"])
    assert all(torch.equal(before[n], v) for n, v in trainable(tr).items())
    assert all(p.grad is None for p in tr.unwrapped.parameters())  # dropped, not carried into the next step
    assert tr.train_step()["skipped_nonfinite"] == 0


def test_non_finite_steps_in_a_row_stop_the_run_before_a_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    tr = make_trainer(cfg(run_dir, max_nonfinite_steps=2)).setup()
    init = trainable(tr)
    _nan_loss_at(monkeypatch, tr, {1, 2, 3, 4})
    with pytest.warns(ckpt.TrainingWarning), pytest.raises(FloatingPointError, match="max_nonfinite_steps=2"):
        tr.train()
    assert [m["skipped_nonfinite"] for m in read_jsonl(RunDir(run_dir).metrics)] == [1, 1]
    assert RunDir(run_dir).checkpoint_folders() == []
    assert all(torch.equal(init[n], v) for n, v in trainable(tr).items())


def test_a_checkpoint_or_final_model_is_never_written_with_non_finite_weights(tmp_path):
    run_dir = tmp_path / "run"
    tr = make_trainer(cfg(run_dir)).setup()
    tr.train_step()
    name, p = next((n, p) for n, p in tr.unwrapped.named_parameters() if p.requires_grad)
    with torch.no_grad():
        p.view(-1)[0] = math.nan
    with pytest.raises(ckpt.NonFiniteCheckpoint, match=f"step 1: .*trainable: {name}"):
        tr.save_checkpoint()
    files = RunDir(run_dir)
    assert files.checkpoint_folders() == [] and not list(files.checkpoints.glob(".tmp-*"))
    assert not files.checkpoint_log.exists()
    with pytest.raises(ckpt.NonFiniteCheckpoint, match="final model"):
        tr.save_final()
    assert not files.final.exists()


# -- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, expected", [
    ("optim.lr", ".inf", "a finite number"), ("optim.lr", ".nan", "optim.lr"), ("optim.lr", "-0.001", "> 0"),
    ("optim.lr", "0", "> 0"), ("optim.weight_decay", "-0.1", ">= 0"), ("optim.weight_decay", ".inf", "finite"),
    ("optim.betas", "[0.9, 1.0]", "[0, 1)"), ("optim.betas", "[.nan, 0.999]", "optim.betas"),
    ("optim.max_grad_norm", ".inf", "finite"), ("optim.max_grad_norm", "0", "null or a float > 0"),
    ("train.ema_decay", ".nan", "(0, 1)"), ("loss.temperature", ".inf", "finite"),
    ("rollout.temperature", ".nan", "> 0"), ("rollout.max_logprob_diff", ".inf", "finite"),
    ("loss.control_advantage", ".inf", "finite"), ("method.beta", ".inf", "finite"),
    ("rollout.vllm.kv_cache_gib", ".inf", "finite"), ("train.max_nonfinite_steps", "0", ">= 1"),
])
def test_non_finite_and_out_of_range_values_are_refused_naming_the_field(key, value, expected):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({}, parse_overrides([f"{key}={value}"]))
    assert str(err.value).startswith(f"{key}") and expected in str(err.value), str(err.value)


def test_a_directly_built_config_is_checked_too():
    from opsdl_core.config import OptimConfig

    with pytest.raises(ConfigError, match=r"optim\.lr: expected a finite number, got inf"):
        RunConfig(optim=OptimConfig(lr=math.inf))
    with pytest.raises(ConfigError, match=r"data\.curriculum\.families\.kv_lookup: expected a finite number"):
        RunConfig.from_dict({"data": {"source": "curriculum", "curriculum": {"families": {"kv_lookup": math.inf}}}})
