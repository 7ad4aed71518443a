"""LongBench v2, official protocol: data checks, the 0-shot prompt, middle truncation in the model's
tokens, answer extraction, per-bucket scoring, and the lm-eval task end to end (slow)."""

from __future__ import annotations

import json

import pytest

from evals.longbench_v2.longbench_v2 import (DATA_URL, ENV_VAR, build_prompt, chat_template_tokens,
                                             default_max_input_tokens, extract_answer, load_rows, middle_truncate,
                                             model_window, resolve_data_path, score)

LONG_CONTEXT = "HEADMARK " + "The quick brown fox jumps over the lazy dog. " * 700 + "TAILMARK"
# (difficulty, length, answer, context): 2 easy / 4 hard, 3 short / 2 medium / 1 long; one context
# far beyond the tiny model's 4096-token window
SPEC = [("easy", "short", "A", "Alice was beginning to get very tired."),
        ("easy", "medium", "B", "Call me Ishmael. Some years ago."),
        ("hard", "short", "C", "  The meeting was moved to Wednesday.\n"),
        ("hard", "medium", "D", "Water boils at 100 degrees Celsius."),
        ("hard", "short", "A", "In the year 1969, astronauts landed on the Moon."),
        ("hard", "long", "B", LONG_CONTEXT)]


def _rows():
    return [{"_id": f"id{i:02d}", "domain": "Single-Document QA", "sub_domain": "Literary", "difficulty": d,
             "length": n, "question": f" Question {i}? ", "choice_A": "red", "choice_B": " blue ", "choice_C": "green",
             "choice_D": "gold", "answer": a, "context": c} for i, (d, n, a, c) in enumerate(SPEC)]


@pytest.fixture
def data_json(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(_rows(), ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_rows_load_from_a_json_list_and_from_json_lines(data_json, tmp_path):
    rows = load_rows(data_json)
    assert [r["_id"] for r in rows] == [f"id{i:02d}" for i in range(6)]
    assert rows[5]["context"] == LONG_CONTEXT and rows[2]["difficulty"] == "hard"
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({**r, "extra": 1}) for r in _rows()) + "\n", encoding="utf-8")
    assert load_rows(jsonl) == rows  # unknown fields are dropped


def test_prompt_is_the_official_0shot_template_with_stripped_fields():
    row = _rows()[2]
    assert build_prompt(row) == (
        "Please read the following text and answer the question below.\n\n<text>\n"
        "The meeting was moved to Wednesday.\n</text>\n\n"
        "What is the correct answer to this question: Question 2?\nChoices:\n(A) red\n(B) blue\n(C) green\n(D) gold\n\n"
        'Format your response as follows: "The correct answer is (insert answer here)".')


@pytest.mark.parametrize(("response", "letter"), [
    ("The correct answer is (C).", "C"),
    ("I think The correct answer is (A)", "A"),
    ("**The correct answer is (B)**", "B"),
    ("The correct answer is **D**.", "D"),
    ("The correct answer is B because of the third paragraph.", "B"),
    ("The correct answer is (E)", None),
    ("the correct answer is (A)", None),  # the official regex is case-sensitive
    ("Answer: C", None),
    ("", None),
])
def test_extract_answer_follows_pred_py(response, letter):
    assert extract_answer(response) == letter


def test_score_puts_each_doc_in_overall_and_its_own_two_buckets():
    for row in _rows():
        right = score(row, f" The correct answer is ({row['answer']}).\n")
        assert right == {"overall": 1.0, row["difficulty"]: 1.0, row["length"]: 1.0}
        wrong = "B" if row["answer"] != "B" else "C"
        assert score(row, f"The correct answer is ({wrong})") == {"overall": 0.0, row["difficulty"]: 0.0,
                                                                  row["length"]: 0.0}
        assert score(row, "no idea")["overall"] == 0.0


@pytest.mark.parametrize("max_tokens", [300, 301])
def test_middle_truncation_keeps_head_and_tail_and_fits_in_model_tokens(tiny_tokenizer, max_tokens):
    prompt = build_prompt(_rows()[5])
    ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) > 4096
    out, n, truncated = middle_truncate(prompt, tiny_tokenizer, max_tokens)
    assert truncated and n == len(tiny_tokenizer(out, add_special_tokens=False)["input_ids"]) <= max_tokens
    assert n >= max_tokens - 2  # the official cut keeps max//2 + ceil(max/2) tokens, give or take a merge
    head = tiny_tokenizer.decode(ids[:max_tokens // 2])
    tail = tiny_tokenizer.decode(ids[-(max_tokens - max_tokens // 2):])
    assert out == head + tail
    assert out.startswith("Please read the following text and answer the question below.\n\n<text>\nHEADMARK")
    assert out.endswith("TAILMARK\n</text>\n\nWhat is the correct answer to this question: Question 5?\nChoices:\n"
                        "(A) red\n(B) blue\n(C) green\n(D) gold\n\n"
                        'Format your response as follows: "The correct answer is (insert answer here)".')
    short = build_prompt(_rows()[0])
    assert middle_truncate(short, tiny_tokenizer, max_tokens)[::2] == (short, False)


def test_window_defaults_to_the_model_config_minus_generation_and_chat_allowance(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert model_window(config, tiny_tokenizer) == config.max_position_embeddings == 4096
    assert model_window(config, tiny_tokenizer, max_length="2048") == 2048  # --model_args max_length wins
    assert model_window(None, tiny_tokenizer) == 4096  # the tokenizer's model_max_length
    assert default_max_input_tokens(4096) == 4096 - 128 - 32
    assert default_max_input_tokens(4096, chat_overhead_tokens=0) == 3968
    with pytest.raises(ValueError, match="no room"):
        default_max_input_tokens(150)


def test_chat_allowance_is_what_the_template_adds_to_a_user_message(tiny_tokenizer):
    prompt = build_prompt(_rows()[1])
    chat = tiny_tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=False)
    extra = chat_template_tokens(tiny_tokenizer)
    assert extra > 32  # SmolLM2's template brings a default system prompt: a flat 32 would not fit
    assert len(tiny_tokenizer(chat, add_special_tokens=False)["input_ids"]) == (
        len(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]) + extra)


def test_glue_builds_one_doc_per_row_that_fits_the_window(data_json, tiny_model_dir, tiny_tokenizer):
    from evals.longbench_v2.tasks.utils import dataset, process_results

    budget = 4096 - 128 - chat_template_tokens(tiny_tokenizer)
    docs = dataset(data_path=str(data_json), pretrained=str(tiny_model_dir), dtype="float32")["test"]
    assert len(docs) == 6 and "context" not in docs.column_names
    assert [d["truncated"] for d in docs] == [False] * 5 + [True]
    assert budget - 2 <= docs[5]["n_prompt_tokens"] <= budget
    assert docs[0]["prompt"] == build_prompt(_rows()[0])
    kw = {"data_path": str(data_json), "pretrained": str(tiny_model_dir)}
    assert dataset(**kw, chat_overhead_tokens="0")["test"][5]["n_prompt_tokens"] > budget
    small = dataset(**kw, max_input_tokens=500)["test"]
    assert 498 <= small[5]["n_prompt_tokens"] <= 500
    assert process_results(docs[3], ["The correct answer is (D)"]) == {"overall": 1.0, "hard": 1.0, "medium": 1.0}


def test_missing_data_names_the_path_the_metadata_key_the_env_var_and_the_source(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    missing = tmp_path / "nope" / "data.json"
    with pytest.raises(FileNotFoundError) as e:
        resolve_data_path(missing)
    for part in (str(missing), "data_path", ENV_VAR, DATA_URL, "data.json"):
        assert part in str(e.value)
    with pytest.raises(FileNotFoundError, match=f"no data_path given.*{ENV_VAR}"):
        resolve_data_path(None)
    monkeypatch.setenv(ENV_VAR, str(missing))
    with pytest.raises(FileNotFoundError, match=f"from {ENV_VAR}"):
        resolve_data_path(None)
    missing.parent.mkdir()
    missing.write_text("[]")
    assert resolve_data_path(None) == missing


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("answer", "E", r"field 'answer' is 'E'; expected one of \['A', 'B', 'C', 'D'\]"),
    ("difficulty", "medium", r"field 'difficulty' is 'medium'; expected one of \['easy', 'hard'\]"),
    ("length", "huge", r"field 'length' is 'huge'; expected one of \['short', 'medium', 'long'\]"),
    ("choice_C", None, r"missing field 'choice_C'"),
    ("question", 7, r"field 'question' should be a string, got int"),
    ("_id", "id01", r"field '_id' repeats row 1"),
])
def test_a_bad_row_names_its_index_id_and_field(tmp_path, field, value, expected):
    rows = _rows()
    if value is None:
        del rows[2][field]
    else:
        rows[2][field] = value
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"row 2 \(_id 'id0[12]'\): " + expected):
        load_rows(path)


@pytest.mark.slow
def test_lm_eval_cli_runs_the_task_offline_with_every_bucket(tiny_model_dir, tiny_tokenizer, data_json, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={tiny_model_dir},dtype=float32", "--device", "cpu", "--include_path",
           str(root / "evals" / "longbench_v2" / "tasks"), "--tasks", "opsdl_longbench_v2", "--metadata",
           json.dumps({"data_path": str(data_json)}), "--apply_chat_template", "--batch_size", "1",
           "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(root)}
    env.pop(ENV_VAR, None)
    proc = subprocess.run(cmd, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Left truncation applied" not in proc.stderr  # our middle cut left room for the chat template
    (results_file,) = list(out.rglob("results_*.json"))
    payload = json.loads(results_file.read_text())
    r = payload["results"]["opsdl_longbench_v2"]
    for metric in ("overall", "easy", "hard", "short", "medium", "long"):
        assert 0.0 <= r[f"{metric},none"] <= 1.0
    assert payload["n-samples"]["opsdl_longbench_v2"]["effective"] == 6
    (samples_file,) = list(out.rglob("samples_opsdl_longbench_v2_*.jsonl"))
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    counts = {m: sum(m in s["metrics"] for s in samples) for m in ("overall", "easy", "hard", "short", "medium",
                                                                   "long")}
    assert counts == {"overall": 6, "easy": 2, "hard": 4, "short": 3, "medium": 2, "long": 1}
    for m, n in counts.items():  # each bucket is the mean over its own docs
        assert r[f"{m},none"] == pytest.approx(sum(s[m] for s in samples if m in s["metrics"]) / n)
    long_doc = next(s for s in samples if s["doc"]["length"] == "long")
    prompt = long_doc["arguments"]["gen_args_0"]["arg_0"]  # the chat-templated context sent to the model
    assert "HEADMARK" in prompt and "TAILMARK" in prompt and "<|im_start|>user" in prompt
    assert len(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= 4096 - 128
