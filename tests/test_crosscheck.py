"""The cross-check against lm-eval's own RULER: peer task files, per-cell statistics, the
comparison table, and the build probe that keeps lm-eval's unbounded generators from hanging."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from evals.ruler import crosscheck
from evals.ruler.generate import TASKS


def _sample(doc_id: int, length: int, score: float, tokens: int, field: str) -> dict:
    return {"doc_id": doc_id, "doc": {"max_length": length, field: tokens}, str(length): score}


def test_peer_tasks_include_lm_evals_own_files_with_a_metric_for_the_length(tmp_path):
    names = crosscheck.write_peer_tasks(tmp_path, 512)
    assert names == [f"lmeval_ruler_{t}" for t in TASKS]
    for task, name in zip(TASKS, names):
        cfg = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
        src = crosscheck._lm_eval_ruler_dir() / f"{task}.yaml"
        assert cfg["include"] == str(src) and src.is_file()
        assert cfg["task"] == name and cfg["tag"] == []  # not pulled into lm-eval's own `ruler` group
        assert [m["metric"] for m in cfg["metric_list"]] == ["512"]


def test_cell_takes_the_first_n_samples_of_the_length_with_mean_stderr_and_tokens():
    samples = [_sample(i, 1024, float(i % 2), 900 + i, "n_tokens") for i in range(6)]
    samples += [_sample(i, 512, 1.0, 400, "n_tokens") for i in range(6)]  # another length: ignored
    c = crosscheck.cell(list(reversed(samples)), 1024, 4, tokens_field="n_tokens")
    assert c["n"] == 4 and c["acc"] == 0.5  # doc ids 0..3: 0, 1, 0, 1
    assert math.isclose(c["stderr"], math.sqrt((4 * 0.25 / 3) / 4))
    assert c["prompt_tokens"] == pytest.approx(901.5)
    assert crosscheck.cell(samples, 2048, 4, tokens_field="n_tokens") is None
    for i, smp in enumerate(samples):  # as lm-eval logs them: the prompt the model was given
        smp["arguments"] = {"gen_args_0": {"arg_0": "w " * (10 + i), "arg_1": {}}}
    counted = crosscheck.cell(samples, 1024, 4, count=lambda text: len(text.split()))
    assert counted["prompt_tokens"] == pytest.approx(11.5) and counted["acc"] == c["acc"]


def test_compare_puts_both_sides_in_one_row_with_the_difference_and_the_peers_error():
    ours = {f"opsdl_ruler_{t}": [_sample(i, 1024, 1.0 if i < 3 else 0.0, 1000, "n_tokens") for i in range(4)]
            for t in TASKS}
    peer = {(t, 1024): crosscheck.cell([_sample(i, 1024, 0.25 * (i == 0), 980, "length") for i in range(4)],
                                       1024, 4, tokens_field="length") for t in TASKS if t != "vt"}
    peer[("vt", 1024)] = "lm-eval cannot build it: did not return"
    table = crosscheck.compare(ours, peer, [1024], 4)
    assert [r["task"] for r in table] == list(TASKS)
    row = next(r for r in table if r["task"] == "niah_single_1")
    assert row["ours"]["acc"] == 0.75 and row["peer"]["acc"] == pytest.approx(0.0625)
    assert row["diff"] == pytest.approx(0.6875)
    vt = next(r for r in table if r["task"] == "vt")
    assert vt["peer"] is None and "did not return" in vt["peer_error"] and "diff" not in vt
    md = crosscheck.to_markdown(table)
    assert "| niah_single_1 | 1024 | 0.75" in md and "+0.69" in md
    assert "error: lm-eval cannot build it" in md


@pytest.mark.slow
def test_probe_reports_a_peer_generator_that_fails_or_never_returns_instead_of_hanging(tiny_model_dir, tmp_path):
    # At 256 tokens of the tiny tokenizer lm-eval's niah_single_1 raises (no room for its template
    # and 128 answer tokens), and its vt, which adds a long in-context example and then retries
    # without bound, never returns. Both are reported per task; the probe itself returns.
    got = crosscheck.probe_peer(str(tiny_model_dir), 256, ["niah_single_1", "vt"], timeout=20, work=tmp_path)
    assert got["niah_single_1"]["error"].startswith("ValueError: Could not generate any sample")
    assert "did not return within 20 s" in got["vt"]["error"]
    assert json.loads((tmp_path / "probe_256.json").read_text()) == got  # one child built both, then stopped
