"""Fuzzed input rows: every class of malformed row is quarantined at its file, line and field,
and every good row loads unchanged, through the loader, curation, the trainer's data path and
the ``curated_prompts`` asset.

One seeded generator (``random.Random(0)``) plants well over a thousand bad rows among good
ones in JSON-lines files (one per line ending, a BOM file, JSON arrays saved as ``.jsonl``),
in Parquet files and in a ``datasets`` folder, and records for each planted row the line (or
row) and field it must be quarantined under, and at which stage: the loader (malformed), or
the cleaning every path shares (duplicate content under another id, overlap with held-out
rows up to case and whitespace, a context longer than the model's window).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from fuzz_rows import (LOADER_CLASSES, WINDOW, Entry, Planted, Rows, loaded, located, main_entries, table_cases,
                       whole_file_cases, write_jsonl_file)

from opsdl_core.data.curation import curate, match_key
from opsdl_core.data.examples import Example, load_examples
from opsdl_core.data.writers import read_rejected, write_jsonl, write_rejected_jsonl


@dataclass
class Fuzz:
    main: Planted
    held: Planted
    files: list[Planted]
    tables: list[Planted]
    dataset: Planted

    @property
    def all(self) -> list[Planted]:
        return [self.main, *self.files, *self.tables, self.dataset]


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory) -> Fuzz:
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("fuzz")
    rows = Rows(rng)
    held_rows = [{**rows.good(plain=True), "id": f"held{i}"} for i in range(40)]
    held = write_jsonl_file(root / "held.jsonl", [Entry("held", r) for r in held_rows], rng)
    main = write_jsonl_file(root / "main.jsonl", main_entries(rows, held_rows, 1700), rng)
    tables, dataset = table_cases(root / "tables", rows)
    return Fuzz(main, held, whole_file_cases(root / "files", rows), tables, dataset)


@pytest.fixture(scope="module")
def window_tokenizer(tiny_model_dir):
    """The tiny model's tokenizer, its model said to take :data:`WINDOW` tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok.model_max_length = WINDOW
    return tok


def sources(planted: list[Planted]) -> Path:
    """What to load ``planted`` from: its file, or the folder of its files."""
    return planted[0].path if len(planted) == 1 else planted[0].path.parent


def assert_clean(train: list[Example], held: list[Example]) -> None:
    """No duplicate content in ``train``, and nothing of ``held`` in it, up to case and whitespace."""
    hashes = [e.content_hash() for e in train]
    assert len(set(hashes)) == len(hashes)
    assert not set(hashes) & {e.content_hash() for e in held}
    assert not {match_key(e) for e in train} & {match_key(e) for e in held}


CLEANED = ("duplicate", "overlap", "too_long")


# --------------------------------------------------------------------------- tests
def test_the_generator_plants_every_class_over_a_thousand_bad_rows(fuzz):
    classes = sum((p.classes for p in fuzz.all), Counter())
    for cls in (*LOADER_CLASSES, "dup_id", "dup_content", "overlap", "too_long", "good"):
        assert classes[cls] >= 30, (cls, classes[cls])
    for cls in ("array:good", "array:deep", "array:non_object", "parquet:invisible", "parquet:non_finite",
                "parquet:dup_content", "parquet:too_long", "datasets:nul"):
        assert classes[cls] >= 2, (cls, classes[cls])
    for stem in ("bom", "cr_only", "mixed_ends", "bom_crlf", "array_pretty", "array_compact", "array_broken",
                 "leading_array_row", "a_rows", "b_int_question", "c_too_deep", "datasets"):
        assert classes[f"file:{stem}"] == 1, stem
    n_bad = sum(len(p.bad) + len(p.later) for p in fuzz.all)
    assert n_bad >= 1000, n_bad


@pytest.mark.parametrize("which", ["main", "files", "tables", "dataset"])
def test_loader_quarantines_each_planted_row_at_its_line_and_field(fuzz, which):
    planted = {"main": [fuzz.main], "files": fuzz.files, "tables": fuzz.tables, "dataset": [fuzz.dataset]}[which]
    res = load_examples(sources(planted))
    assert located(res.rejected) == set().union(*(p.expected_rejections() for p in planted))
    assert all("expected" in r.reason for r in res.rejected)
    assert loaded(res.examples) == [e for p in planted for e in p.expected_examples()]


def test_quarantine_and_examples_always_write_and_read_back(fuzz, tmp_path):
    res = load_examples(fuzz.main.path)
    back = read_rejected(write_rejected_jsonl(res.rejected, tmp_path / "q.jsonl"))
    assert [(r.source, r.row, r.line, r.field, r.reason) for r in back] == [
        (r.source, r.row, r.line, r.field, r.reason) for r in res.rejected]
    again = load_examples(write_jsonl(res.examples, tmp_path / "out.jsonl"))
    assert again.rejected == [] and again.examples == res.examples


@pytest.mark.parametrize("which", ["main", "tables"])
def test_curate_sets_aside_duplicates_overlaps_and_too_long_rows(fuzz, window_tokenizer, which):
    from opsdl_core.data.prepare import token_counter

    planted = {"main": [fuzz.main], "tables": fuzz.tables}[which]
    held = load_examples(fuzz.held.path).examples
    res = curate(str(sources(planted)), count_tokens=token_counter(window_tokenizer), size=100_000,
                 eval_examples=held, max_tokens=WINDOW)
    assert located(res.quarantined) == set().union(*(p.expected_rejections(*CLEANED) for p in planted))
    assert loaded(res.examples) == [e for p in planted for e in p.expected_examples(without=CLEANED)]
    assert_clean(res.examples, held)


def test_trainer_data_path_dedups_decontaminates_and_guards_the_window(fuzz, window_tokenizer):
    from opsdl_core.config import DataConfig
    from opsdl_core.data.prepare import load_raw, prepare_data

    cfg = DataConfig(source=str(fuzz.main.path), heldout_source=str(fuzz.held.path), train_size=100_000,
                     heldout_size=1000, teacher_context="oracle", short_budget_tokens=256)
    data = prepare_data(cfg, window_tokenizer)
    assert located(data.rejected) == fuzz.main.expected_rejections(*CLEANED)
    assert loaded([p.example for p in data.train]) == fuzz.main.expected_examples(without=CLEANED)
    assert loaded([p.example for p in data.heldout]) == fuzz.held.expected_examples()
    assert_clean([p.example for p in data.train], [p.example for p in data.heldout])
    assert max(len(p.student_ids) for p in data.train) <= WINDOW
    # one file split in two: the halves are disjoint, duplicates are set aside at their lines
    train, heldout, rejected = load_raw(replace(cfg, heldout_source=None, heldout_size=60), window_tokenizer)
    assert len(heldout) == 60
    assert_clean(train, heldout)
    dups = {(str(fuzz.main.path), *k, f) for k, (kind, f) in fuzz.main.later.items() if kind == "duplicate"}
    assert dups <= located(rejected)
    assert all(r.line == r.row + 1 and r.source == str(fuzz.main.path) for r in rejected)


def test_curated_prompts_asset_quarantines_the_planted_rows(fuzz, tiny_model_dir, tmp_path):
    import dagster as dg

    from assets import ALL_ASSETS, ALL_CHECKS, OpsdlResource

    run_config = {"eval_sets": {"config": {"lengths": [160], "n": 2, "in_template_n": 0, "n_distractors": [2, 3],
                                           "foreign_n": 0}},
                  "curated_prompts": {"config": {"source": str(fuzz.main.path), "size": 100_000,
                                                 "max_tokens": WINDOW}}}
    resources = {"opsdl": OpsdlResource(home=str(tmp_path), model=str(tiny_model_dir), num_threads=1),
                 "pipes_subprocess_client": dg.PipesSubprocessClient()}
    result = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], resources=resources, instance=dg.DagsterInstance.ephemeral(),
                            run_config={"ops": run_config},
                            selection=["eval_sets", "curated_prompts", "quarantined_rows"])
    assert result.success
    prompts = result.output_for_node("curated_prompts", "curated_prompts")
    quarantine = read_rejected(result.output_for_node("curated_prompts", "quarantined_rows")["path"])
    # the evaluation data is the synthetic suites here: the rows planted to overlap held.jsonl are kept
    assert located(quarantine) == fuzz.main.expected_rejections("duplicate", "too_long")
    assert prompts["n"] == len(fuzz.main.expected_examples(without=("duplicate", "too_long")))


@pytest.mark.slow
def test_a_thousand_rows_of_every_class_through_the_loader_curation_and_the_trainer_path(tmp_path, window_tokenizer):
    """The same checks at scale: 1,000 rows of each class (and 1,000 good ones) in one file."""
    from opsdl_core.config import DataConfig
    from opsdl_core.data.prepare import prepare_data, token_counter

    rng = random.Random(1)
    rows = Rows(rng)
    held_rows = [{**rows.good(plain=True), "id": f"held{i}"} for i in range(40)]
    held = write_jsonl_file(tmp_path / "held.jsonl", [Entry("held", r) for r in held_rows], rng)
    main = write_jsonl_file(tmp_path / "main.jsonl", main_entries(rows, held_rows, 0, per_class=1000), rng)
    for cls in (*LOADER_CLASSES, "overlap", "too_long", "good"):
        assert main.classes[cls] >= 1000, (cls, main.classes[cls])
    assert min(main.classes["dup_id"], main.classes["dup_content"]) >= 990  # those before any good row are skipped
    res = load_examples(main.path)
    assert located(res.rejected) == main.expected_rejections()
    assert loaded(res.examples) == main.expected_examples()
    held_examples = load_examples(held.path).examples
    cur = curate(str(main.path), count_tokens=token_counter(window_tokenizer), size=100_000,
                 eval_examples=held_examples, max_tokens=WINDOW)
    assert located(cur.quarantined) == main.expected_rejections(*CLEANED)
    assert_clean(cur.examples, held_examples)
    data = prepare_data(DataConfig(source=str(main.path), heldout_source=str(held.path), train_size=100_000,
                                   heldout_size=1000, teacher_context="oracle", short_budget_tokens=256),
                        window_tokenizer)
    assert located(data.rejected) == main.expected_rejections(*CLEANED)
    assert loaded([p.example for p in data.train]) == main.expected_examples(without=CLEANED)
    assert_clean([p.example for p in data.train], [p.example for p in data.heldout])

