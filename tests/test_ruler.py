"""RULER generators: lengths in the model's tokens, one answer at the requested depth, the scorer."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from evals.ruler.generate import NEEDLE, TASKS, generate, string_match_all, string_match_part


@pytest.fixture(scope="module")
def count_tokens():
    from opsdl_core.data.prepare import token_counter
    from opsdl_core.models.tiny import build_tiny_model

    _, tok = build_tiny_model(seed=0)
    return token_counter(tok)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [512, 1024])
def test_prompts_fit_the_length_in_model_tokens_and_fill_it(task, length, count_tokens):
    if task == "cwe":
        length *= 2  # 10 common words x 6 repeats do not fit in 512 tiny-BPE tokens (the error is tested below)
    samples = generate(task, length=length, n=3, count_tokens=count_tokens, tokens_to_generate=64)
    for s in samples:
        assert s.n_tokens == count_tokens(s.input + "\n" + s.gen_prefix)
        assert s.n_tokens + 64 <= length
        # as large as fits: one more haystack unit would not fit, so the prompt is close to the budget
        assert s.n_tokens > 0.8 * (length - 64), (task, s.n_tokens)
        assert s.outputs and all(o for o in s.outputs)
    assert len({s.input for s in samples}) == 3  # seeded per sample, not copies
    again = generate(task, length=length, n=3, count_tokens=count_tokens, tokens_to_generate=64)
    assert [s.input for s in again] == [s.input for s in samples]


@pytest.mark.parametrize("task", ["niah_single_1", "niah_multikey_2", "niah_multikey_3"])
def test_niah_answer_occurs_once_at_the_requested_depth(task, count_tokens):
    depths = [0, 25, 50, 75, 100]
    for s in generate(task, length=1024, n=5, count_tokens=count_tokens, depths=depths, tokens_to_generate=64):
        (value,) = s.outputs
        assert s.input.count(value) == 1
        type_v = "uuid" if task.endswith("3") else "number"
        needle = NEEDLE.format(type_v=type_v + "s", key=s.metadata["key"], value=value)
        assert s.input.count(needle) == 1 and s.input.count(s.metadata["key"]) == 2  # the needle and the question
        body = s.input.split("afterwards.\n", 1)[1].rsplit("\nWhat is", 1)[0]
        where = 100 * body.index(needle) / max(len(body) - len(needle), 1)
        assert abs(where - s.depth) <= 100 / s.metadata["haystack_units"] + 1, (s.depth, where)


def test_vt_chain_is_complete_in_order_from_the_depth(count_tokens):
    for s in generate("vt", length=1024, n=4, count_tokens=count_tokens, depths=[0, 30, 60, 90],
                      tokens_to_generate=64):
        value = s.metadata["value"]
        assert s.input.count(f"= {value}") == 1
        names = s.outputs
        stmts = [f"VAR {names[0]} = {value}"] + [f"VAR {names[i]} = VAR {names[i - 1]}" for i in range(1, len(names))]
        offsets = [s.input.index(st) for st in stmts]
        assert offsets == sorted(offsets) and all(s.input.count(st) == 1 for st in stmts)
        body = s.input.split("text.\n\n", 1)[1]
        assert abs(100 * body.index(stmts[0]) / len(body) - s.depth) <= 10


def test_cwe_and_fwe_answers_are_the_most_frequent_words(count_tokens):
    for s in generate("cwe", length=2048, n=2, count_tokens=count_tokens, tokens_to_generate=64):
        words = re.findall(r"\d+\. (\S+)", s.input)
        counts = Counter(words)
        assert all(counts[w] == 6 for w in s.outputs) and len(s.outputs) == 10  # below 4K: 6 and 1
        assert max(c for w, c in counts.items() if w not in s.outputs) == 1
    for s in generate("fwe", length=1024, n=2, count_tokens=count_tokens, tokens_to_generate=64):
        body = s.input.split("coded words.\n", 1)[1].split("\nQuestion:", 1)[0]
        counts = Counter(body.split(" .... "))
        top = [w for w, _ in counts.most_common(3)]
        ranked = counts.most_common()
        assert top == s.outputs and len(ranked) > 3 and ranked[2][1] > ranked[3][1]


def test_scorer_counts_right_and_wrong_answers():
    assert string_match_all("The special magic number is 1234567.", ["1234567"]) == 1.0
    assert string_match_all("The special magic number is 7654321.", ["1234567"]) == 0.0
    assert string_match_all("ABCDE, FGHIJ", ["abcde", "fghij", "klmno", "pqrst"]) == 0.5
    assert string_match_part("it is Paris", ["paris", "Lyon"]) == 1.0
    assert string_match_part("it is Rome", ["paris", "Lyon"]) == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        string_match_all("x", [])


def test_bad_task_and_too_short_length_name_the_problem(count_tokens):
    with pytest.raises(ValueError, match="unknown RULER task 'niah_9'"):
        generate("niah_9", length=512, n=1, count_tokens=count_tokens)
    with pytest.raises(ValueError, match="niah_single_1 at length 100: the smallest prompt has"):
        generate("niah_single_1", length=100, n=1, count_tokens=count_tokens, tokens_to_generate=64)
    with pytest.raises(ValueError, match="cwe at length 512: the smallest prompt has"):
        generate("cwe", length=512, n=1, count_tokens=count_tokens, tokens_to_generate=64)


@pytest.mark.slow
def test_lm_eval_cli_runs_the_group_offline_with_one_row_per_length(tiny_model_dir, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={tiny_model_dir},dtype=float32", "--device", "cpu", "--include_path",
           str(root / "evals" / "ruler" / "tasks"), "--tasks", "opsdl_ruler", "--metadata",
           '{"max_seq_lengths": [1024, 2048], "num_samples": 2}', "--batch_size", "1", "--output_path", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = list(out.rglob("results_*.json"))
    results = json.loads(results_file.read_text())["results"]
    group = results["opsdl_ruler"]
    assert {k.split(",")[0] for k in group if k[0].isdigit() and "stderr" not in k} == {"1024", "2048"}
    for task in TASKS:
        r = results[f"opsdl_ruler_{task}"]
        assert 0.0 <= r["1024,none"] <= 1.0 and 0.0 <= r["2048,none"] <= 1.0
        assert isinstance(r["1024_stderr,none"], float)  # aggregation "mean": lm-eval reports a stderr
    assert results["opsdl_ruler"]["1024,none"] == pytest.approx(
        sum(results[f"opsdl_ruler_{t}"]["1024,none"] for t in TASKS) / len(TASKS))
