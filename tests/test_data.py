"""Loading, validation and atomic writing of (C_L, C_s, Q) examples."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opsdl_core.data.examples import Example, LoadResult, RejectedRow, load_examples, validate_row
from opsdl_core.data.writers import read_rejected, write_jsonl, write_rejected_jsonl


def good(i: int, **over) -> dict:
    row = {
        "id": f"ex{i}",
        "long_context": f"Filler before. The code for item {i} is {1000 + i}. Filler after.",
        "short_context": f"The code for item {i} is {1000 + i}.",
        "question": f"What is the code for item {i}?",
        "answer": str(1000 + i),
    }
    row.update(over)
    return row


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def by_row(result: LoadResult) -> dict[int, RejectedRow]:
    return {r.row: r for r in result.rejected}


def test_jsonl_good_rows_pass_and_each_bad_row_is_named(tmp_path):
    bad_missing = good(1)
    del bad_missing["question"]
    lines = [
        json.dumps(good(0)),                                               # 0 ok
        json.dumps(bad_missing),                                           # 1 missing question
        json.dumps(good(2, long_context=5)),                               # 2 wrong type
        json.dumps(good(3, short_context="Not in the context at all.")),   # 3 evidence not in C_L
        '{"id": "ex4", "long_context": "broken',                           # 4 invalid JSON
        json.dumps([1, 2, 3]),                                             # 5 non-object row
        json.dumps(good(6, id="ex0")),                                     # 6 duplicate id of row 0
        "",                                                                # 7 blank: skipped, counted
        json.dumps(good(8, answer=42)),                                    # 8 ok, int answer -> "42"
        json.dumps(good(9, question="   ")),                               # 9 whitespace-only question
        json.dumps(good(10)),                                              # 10 ok
    ]
    path = write_lines(tmp_path / "rows.jsonl", lines)
    res = load_examples(path)

    assert [e.id for e in res.examples] == ["ex0", "ex8", "ex10"]
    assert res.examples[1].answer == "42"
    assert all(e.source == str(path) for e in res.examples)
    rej = by_row(res)
    assert sorted(rej) == [1, 2, 3, 4, 5, 6, 9]
    assert all(r.source == str(path) for r in res.rejected)
    assert rej[1].field == "question" and "missing" in rej[1].reason and "non-empty string" in rej[1].reason
    assert rej[2].field == "long_context" and "expected a non-empty string" in rej[2].reason and "int 5" in rej[2].reason
    assert rej[3].field == "short_context" and "does not occur verbatim" in rej[3].reason
    assert rej[4].field == "" and "line 5" in rej[4].reason and "invalid JSON" in rej[4].reason and rej[4].raw is None
    assert rej[5].field == "" and "expected a JSON object" in rej[5].reason and "list" in rej[5].reason
    assert rej[6].field == "id" and "duplicate id 'ex0'" in rej[6].reason and "row 0" in rej[6].reason
    assert rej[6].raw is not None and rej[6].raw["id"] == "ex0"
    assert rej[9].field == "question" and "whitespace" in rej[9].reason


def test_invalid_utf8_line_is_rejected_not_raised(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps(good(0)).encode() + b"\n\xff\xfe{}\n" + json.dumps(good(2)).encode() + b"\n")
    res = load_examples(path)
    assert [e.id for e in res.examples] == ["ex0", "ex2"]
    assert len(res.rejected) == 1 and res.rejected[0].row == 1 and "UTF-8" in res.rejected[0].reason


def test_parquet_good_and_bad_rows(tmp_path):
    rows = [good(0), good(1, short_context="absent evidence"), good(2, answer=None)]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    res = load_examples(path)
    assert [e.id for e in res.examples] == ["ex0", "ex2"]
    assert res.examples[1].answer is None
    assert len(res.rejected) == 1
    r = res.rejected[0]
    assert (r.row, r.field, r.source) == (1, "short_context", str(path))


def test_datasets_save_to_disk_folder(tmp_path):
    import datasets

    rows = [good(i, metadata={"k": i}) for i in range(3)] + [good(3, metadata={"k": 3}, question="")]
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    res = load_examples(folder)
    assert [e.id for e in res.examples] == ["ex0", "ex1", "ex2"]
    assert [e.metadata["k"] for e in res.examples] == [0, 1, 2]
    assert res.examples[0].source == str(folder)
    assert [(r.row, r.field) for r in res.rejected] == [(3, "question")]


def test_folder_of_mixed_files_sorted_with_per_file_source(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_lines(folder / "b.jsonl", [json.dumps(good(2)), json.dumps(good(0, long_context="The code for item 0 is 1000."))])
    pq.write_table(pa.Table.from_pylist([good(0), good(1)]), folder / "a.parquet")
    (folder / "README.txt").write_text("not data")
    res = load_examples(folder)
    assert [e.id for e in res.examples] == ["ex0", "ex1", "ex2"]
    assert [e.source for e in res.examples] == [str(folder / "a.parquet")] * 2 + [str(folder / "b.jsonl")]
    (dup,) = res.rejected
    assert dup.source == str(folder / "b.jsonl") and dup.row == 1 and dup.field == "id"
    assert "row 0 of" in dup.reason and "a.parquet" in dup.reason


def test_field_map_maps_user_columns(tmp_path):
    fmap = {"long_context": "context", "short_context": "evidence", "question": "q", "answer": "gold"}
    rows = [{"context": "A b c. Key fact here. D e.", "evidence": "Key fact here.", "q": "What fact?", "gold": "key"},
            {"context": "Only context.", "q": "Where is the evidence?"}]
    path = write_lines(tmp_path / "user.jsonl", [json.dumps(r) for r in rows])
    res = load_examples(path, field_map=fmap)
    (ex,) = res.examples
    assert (ex.long_context, ex.short_context, ex.question, ex.answer) == (
        "A b c. Key fact here. D e.", "Key fact here.", "What fact?", "key")
    (r,) = res.rejected
    assert r.row == 1 and r.field == "short_context" and "'evidence'" in r.reason
    with pytest.raises(ValueError, match="unknown field"):
        validate_row(rows[0], row=0, source="x", field_map={"contxt": "context"})


def test_validate_row_conversions_defaults_and_rejections():
    ex = validate_row(good(0, answer=5.0, id=None), row=0, source="mem")
    assert isinstance(ex, Example)
    assert ex.answer == "5" and ex.source == "mem"
    assert ex.id == ex.content_hash()[:16] and len(ex.id) == 16
    assert validate_row(good(0, answer=2.5), row=0, source="mem").answer == "2.5"
    assert validate_row(good(0, answer=""), row=0, source="mem").answer is None
    assert validate_row(good(0, id=7), row=0, source="mem").id == "7"
    assert validate_row(good(0, source="wiki"), row=0, source="mem").source == "wiki"

    for over, fld, expect in [({"answer": True}, "answer", "expected a string, a number or null"),
                              ({"answer": float("nan")}, "answer", "finite number"),
                              ({"answer": ["a"]}, "answer", "got list"),
                              ({"metadata": [1]}, "metadata", "expected a JSON object"),
                              ({"metadata": {"x": object()}}, "metadata", "JSON-serialisable"),
                              ({"id": 1.5}, "id", "expected a non-empty string, an int or null")]:
        r = validate_row(good(3, **over), row=3, source="mem")
        assert isinstance(r, RejectedRow), over
        assert (r.row, r.field, r.source) == (3, fld, "mem") and expect in r.reason, (over, r.reason)

    loose = validate_row(good(0, short_context="elsewhere"), row=0, source="m", require_evidence_in_context=False)
    assert isinstance(loose, Example) and loose.short_context == "elsewhere"
    # no normalisation: whitespace differences count as "not in context"
    r = validate_row(good(0, short_context="The code  for item 0 is 1000."), row=0, source="m")
    assert isinstance(r, RejectedRow) and r.field == "short_context"


def test_content_hash_is_canonical():
    a = validate_row(good(0), row=0, source="a")
    b = validate_row(good(0, id="other", metadata={"x": 1}), row=5, source="b")
    c = validate_row(good(0, answer="different"), row=0, source="a")
    assert a.content_hash() == b.content_hash() != c.content_hash()
    assert len(a.content_hash()) == 64 and int(a.content_hash(), 16) >= 0


def test_write_jsonl_round_trip(tmp_path):
    exs = [validate_row(good(i, metadata={"i": i, "tags": ["x"]}), row=i, source="orig.jsonl") for i in range(3)]
    out = write_jsonl(exs, tmp_path / "sub" / "out.jsonl")
    assert out == tmp_path / "sub" / "out.jsonl"
    res = load_examples(out)
    assert res.rejected == []
    assert res.examples == exs  # source and metadata survive the round trip


def test_write_jsonl_is_atomic_when_the_iterable_raises(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("previous content\n")
    exs = [validate_row(good(i), row=i, source="s") for i in range(3)]

    def exploding():
        yield exs[0]
        yield exs[1]
        raise RuntimeError("boom midway")

    with pytest.raises(RuntimeError, match="boom midway"):
        write_jsonl(exploding(), target)
    assert target.read_text() == "previous content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temp file left behind

    fresh = tmp_path / "fresh.jsonl"
    with pytest.raises(RuntimeError):
        write_jsonl(exploding(), fresh)
    assert not fresh.exists()


def test_rejected_round_trip(tmp_path):
    rejected = [RejectedRow("a.jsonl", 3, "question", "expected a non-empty string, got int 5", {"question": 5}),
                RejectedRow("b.parquet", 0, "", "line 1: invalid JSON", None)]
    path = write_rejected_jsonl(rejected, tmp_path / "rejected.jsonl")
    assert read_rejected(path) == rejected
    (tmp_path / "junk.jsonl").write_text('{"row": 1}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_rejected(tmp_path / "junk.jsonl")


def test_unusable_paths_raise_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown file type '.csv'"):
        load_examples(tmp_path / "data.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        load_examples(tmp_path / "empty")


@pytest.mark.parametrize("text", ["\u200b", "\u200c\u200d", "\u2060", "\ufeff", "\u00ad", " \u200b\t", "\u3164",
                                  "\u2028\u2029", "\x00\x01"])
def test_text_of_invisible_characters_only_counts_as_empty(text):
    for name in ("long_context", "short_context", "question", "id"):
        r = validate_row(good(0, **{name: text}), row=0, source="m")
        assert isinstance(r, RejectedRow) and r.field == name, (name, r)
        assert "non-empty string" in r.reason
    r = validate_row(good(0, answer="\u200b\u00ad"), row=0, source="m")
    assert isinstance(r, RejectedRow) and r.field == "answer" and "invisible" in r.reason
    if "\x00" not in text:  # visible text around invisible characters is kept as it is
        ex = validate_row(good(0, question=f"What is{text}the code for item 0?"), row=0, source="m")
        assert isinstance(ex, Example) and ex.question == f"What is{text}the code for item 0?"


def test_every_line_end_a_bom_and_a_json_array_keep_each_row_at_its_line(tmp_path):
    rows = [json.dumps(good(i)) for i in range(3)]
    (tmp_path / "cr.jsonl").write_bytes(("\ufeff" + "\r".join(rows) + "\r\n\r" + json.dumps(good(3, question="")))
                                        .encode())
    res = load_examples(tmp_path / "cr.jsonl")
    assert [(e.id, e.origin.line) for e in res.examples] == [("ex0", 1), ("ex1", 2), ("ex2", 3)]
    assert [(r.row, r.line, r.field) for r in res.rejected] == [(4, 5, "question")]
    (tmp_path / "array.jsonl").write_text(json.dumps([good(0), good(1, long_context=7), good(2)], indent=2))
    res = load_examples(tmp_path / "array.jsonl")
    assert [(e.id, e.origin.row, e.origin.line) for e in res.examples] == [("ex0", 0, 2), ("ex2", 2, 16)]
    assert [(r.row, r.line, r.field) for r in res.rejected] == [(1, 9, "long_context")]
    assert "row 1 (line 9)" in res.rejected[0].location


def test_values_json_cannot_carry_are_rejected_with_their_field_and_never_raise(tmp_path):
    lines = ['{"id": "a", "long_context": "x", "short_context": "x", "question": "q", "metadata": '
             + "[" * 100_000 + "]" * 100_000 + "}",
             json.dumps(good(1))[:-1] + ', "answer": ' + "9" * 5000 + "}",
             json.dumps(good(2, question="What \ud800?")),
             json.dumps(good(3))[:-1] + ', "metadata": {"x": NaN}}']
    path = write_lines(tmp_path / "rows.jsonl", lines)
    res = load_examples(path)
    assert res.examples == []
    assert [(r.line, r.field) for r in res.rejected] == [(1, "metadata"), (2, "answer"), (3, "question"),
                                                         (4, "metadata")]
    assert read_rejected(write_rejected_jsonl(res.rejected, tmp_path / "q.jsonl"))[2].raw is not None
    bad = Example("nan", "c", "c", "q", metadata={"x": float("nan")})
    with pytest.raises(ValueError, match="example 'nan' cannot be written"):
        write_jsonl([bad], tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_model_window_reads_the_tokenizer_and_the_model_folder_without_loading_the_model(tmp_path):
    from types import SimpleNamespace

    from opsdl_core.data.prepare import model_window

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    assert model_window(SimpleNamespace(model_max_length=8192, name_or_path=str(tmp_path))) == 2048
    assert model_window(SimpleNamespace(model_max_length=int(1e30), name_or_path="")) is None
    assert model_window(SimpleNamespace(model_max_length=512, name_or_path="some/hub-id")) == 512


def test_every_example_stream_has_its_own_seed_at_every_length():
    from opsdl_core.data.seeds import STREAMS, stream_seed

    lengths = (0, 256, 1024, 131072)  # a suite adds its context length to its stream's seed
    seeds = [stream_seed(s, name, length=L) for s in (0, 1, 7) for name in STREAMS for L in lengths]
    assert len(set(seeds)) == len(seeds)  # no two (run seed, stream, length) draw the same questions
    with pytest.raises(ValueError, match="unknown example stream 'heldout_v2'"):
        stream_seed(0, "heldout_v2")


def test_a_prompt_must_leave_room_in_the_window_for_its_answer(tiny_model_and_tokenizer):
    from opsdl_core.config import DataConfig
    from opsdl_core.data.prepare import prepare_examples
    from opsdl_core.data.prompts import chat_prompt_ids

    ex = Example("e1", "Filler words here. The code for lime is 4821. More filler.", "The code for lime is 4821.",
                 "What is the code for lime?", "4821")
    _, tok = tiny_model_and_tokenizer
    n = len(chat_prompt_ids(tok, ex.long_context, ex.question))
    tok.model_max_length = n + 5
    cfg = DataConfig(teacher_context="oracle")
    good, bad = prepare_examples([ex], tok, cfg, answer_tokens=5)
    assert [p.example.id for p in good] == ["e1"] and not bad
    good, bad = prepare_examples([ex], tok, cfg, answer_tokens=6)
    assert not good and [(r.field, r.row) for r in bad] == [("long_context", 0)]
    assert f"has {n} tokens; expected at most {n - 1}" in bad[0].reason and "6-token answer" in bad[0].reason
