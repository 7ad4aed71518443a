"""RULER's essay NIAH and QA tasks from the user's files: fixtures in the real files' formats."""

from __future__ import annotations

import json

import pytest

from evals.ruler.documents import ESSAY_TASKS, generate_document_task, load_essay_sentences, resolve_source
from evals.ruler.generate import NEEDLE, string_match_part

_WORDS = ("river", "stone", "garden", "window", "letter", "market", "teacher", "engine", "summer", "village")


def _essay_text(seed: int, n: int = 80) -> str:
    out = []
    for i in range(n):
        a, b, c = (_WORDS[(seed + i * k) % len(_WORDS)] for k in (1, 3, 7))
        out.append(f"The {a} near the {b} was quieter than any {c} I had seen in year {1900 + i}.")
    return " ".join(out)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ruler_files")
    essays = root / "essays"
    essays.mkdir()
    for i in range(3):
        (essays / f"essay{i}.txt").write_text(_essay_text(i))
    squad = {"version": "v2.0", "data": [{"title": f"T{a}", "paragraphs": [
        {"context": f"Paragraph {a}-{p}. " + _essay_text(a + p, 6),
         "qas": [{"question": f"Which year is paragraph {a}-{p} about?", "id": f"q{a}{p}", "is_impossible": False,
                  "answers": [{"text": f"year {1900 + p}", "answer_start": 0}]},
                 {"question": "An unanswerable one?", "id": f"u{a}{p}", "is_impossible": True, "answers": [],
                  "plausible_answers": [{"text": "x", "answer_start": 0}]}]} for p in range(4)]} for a in range(5)]}
    (root / "dev-v2.0.json").write_text(json.dumps(squad))
    hotpot = [{"_id": f"h{i}", "question": f"Who built bridge {i}?", "answer": f"Builder{i}", "type": "bridge",
               "level": "easy", "supporting_facts": [[f"Bridge {i}", 0]],
               "context": [[f"Bridge {i}", [f"Bridge {i} was built by Builder{i}. ", _essay_text(i, 3)]],
                           [f"Town {i}", [_essay_text(i + 1, 4)]]]} for i in range(20)]
    (root / "hotpot_dev_distractor_v1.json").write_text(json.dumps(hotpot))
    return {"essays_path": str(essays), "squad_path": str(root / "dev-v2.0.json"),
            "hotpotqa_path": str(root / "hotpot_dev_distractor_v1.json")}


@pytest.fixture(scope="module")
def count_tokens():
    from opsdl_core.data.prepare import token_counter
    from opsdl_core.models.tiny import build_tiny_model

    _, tok = build_tiny_model(seed=0)
    return token_counter(tok)


@pytest.mark.parametrize("task", ESSAY_TASKS)
def test_essay_needles_occur_once_each_the_first_at_the_requested_depth(task, files, count_tokens):
    depths = [0, 50, 100]
    samples = generate_document_task(task, length=1024, n=3, count_tokens=count_tokens, options=files,
                                     depths=depths, tokens_to_generate=64)
    for s in samples:
        assert s.n_tokens + 64 <= 1024 and s.n_tokens > 0.8 * (1024 - 64)
        expected_answers = 4 if task in ("niah_multivalue", "niah_multiquery") else 1
        assert len(s.outputs) == expected_answers
        body = s.input.split("afterwards.\n", 1)[1].rsplit("\nWhat ", 1)[0]
        for value in s.outputs:
            assert body.count(value) == 1, (task, value)
        for key in s.metadata["keys"]:
            assert key in s.gen_prefix  # every asked key is named in the question and the answer prefix
        first = next(n for n in (NEEDLE.format(type_v=t, key=s.metadata["keys"][0], value=s.outputs[0])
                                 for t in ("numbers", "uuids")) if n in body)
        where = 100 * body.index(first) / max(len(body) - len(first), 1)
        assert abs(where - s.depth) <= 12, (task, s.depth, where)  # other needles shift it by a few sentences
    assert len({s.input for s in samples}) == 3


@pytest.mark.parametrize("task,path_key", [("qa_1", "squad_path"), ("qa_2", "hotpotqa_path")])
def test_qa_prompt_holds_the_gold_paragraph_and_fits(task, path_key, files, count_tokens):
    samples = generate_document_task(task, length=1024, n=4, count_tokens=count_tokens, options=files,
                                     tokens_to_generate=32)
    for s in samples:
        assert s.n_tokens + 32 <= 1024 and s.metadata["n_docs"] >= 2
        assert any(o in s.input for o in s.outputs)  # the answer is in the documents given
        assert s.input.startswith("Answer the question based on the given documents.")
        assert s.gen_prefix == "Answer:" and s.metadata["match"] == "part"
    if task == "qa_1":  # unanswerable SQuAD questions are not asked
        assert all("unanswerable" not in s.input.rsplit("Question:", 1)[1] for s in samples)
    assert string_match_part("It was year 1902, I think.", ["year 1902", "1902"]) == 1.0
    assert string_match_part("year 1903", ["year 1902"]) == 0.0


def test_missing_files_and_bad_rows_give_named_errors(files, tmp_path, count_tokens, monkeypatch):
    monkeypatch.delenv("OPSDL_RULER_ESSAYS", raising=False)
    monkeypatch.setenv("OPSDL_CACHE_DIR", str(tmp_path))  # an empty cache: no fetched essays to fall back on
    with pytest.raises(FileNotFoundError, match=r"niah_single_2 needs .*essays_path.*OPSDL_RULER_ESSAYS"):
        resolve_source("niah_single_2", {})
    with pytest.raises(FileNotFoundError, match=r"qa_1: squad_path = .*nope.json does not exist; expected SQuAD"):
        resolve_source("qa_1", {"squad_path": str(tmp_path / "nope.json")})
    monkeypatch.setenv("OPSDL_RULER_HOTPOTQA", files["hotpotqa_path"])
    assert str(resolve_source("qa_2", {})) == files["hotpotqa_path"]
    bad = tmp_path / "hotpot_bad.json"
    bad.write_text(json.dumps([{"_id": "x1", "question": "q?", "context": []}]))
    with pytest.raises(ValueError, match=r"row 0 \(x1\) lacks 'answer'"):
        generate_document_task("qa_2", length=512, n=1, count_tokens=count_tokens, options={"hotpotqa_path": str(bad)})
    (tmp_path / "short.txt").write_text("Too short. Really.")
    with pytest.raises(ValueError, match="2 sentences; expected at least 20"):
        load_essay_sentences(tmp_path / "short.txt")


def test_a_json_essay_file_as_ruler_ships_it_reads_like_text(files, tmp_path):
    text = _essay_text(1)
    (tmp_path / "PaulGrahamEssays.json").write_text(json.dumps({"text": text}))
    (tmp_path / "e.txt").write_text(text)
    assert load_essay_sentences(tmp_path / "PaulGrahamEssays.json") == load_essay_sentences(tmp_path / "e.txt")
    assert len(load_essay_sentences(tmp_path / "e.txt")) == 80


@pytest.mark.slow
def test_lm_eval_runs_the_full_group_with_the_users_files(tiny_model_dir, files, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    meta = {"max_seq_lengths": [1024], "num_samples": 2, **files}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny_model_dir},dtype=float32",
           "--device", "cpu", "--include_path", str(root / "evals" / "ruler" / "tasks"), "--tasks", "opsdl_ruler_full",
           "--metadata", json.dumps(meta), "--batch_size", "1", "--apply_chat_template",
           "--gen_kwargs", "max_gen_toks=8", "--output_path", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = list(out.rglob("results_*.json"))
    results = json.loads(results_file.read_text())["results"]
    tasks = [t for t in results if t.startswith("opsdl_ruler_") and t != "opsdl_ruler_full"]
    assert len(tasks) == 13
    for t in tasks:
        assert 0.0 <= results[t]["1024,none"] <= 1.0
    assert results["opsdl_ruler_full"]["1024,none"] == pytest.approx(sum(results[t]["1024,none"] for t in tasks) / 13)
