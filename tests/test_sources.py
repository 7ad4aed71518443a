"""One function chooses a source's examples (opsdl_core/data/sources.py): what it draws, what it refuses,
and that no other module of the library calls a generator or the file loader itself."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from opsdl_core.data.prepare import token_counter
from opsdl_core.data.seeds import stream_seed
from opsdl_core.data.sources import draw, is_generated, needle_templates
from opsdl_core.data.tasks.curriculum import generate_curriculum, generate_family
from opsdl_core.data.tasks.needle import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, generate_examples
from opsdl_core.models.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
# the generators and the file loader; only sources.py (and the generators' own modules) may call them
DRAWERS = {"generate_examples", "generate_curriculum", "generate_family", "load_examples"}
ALLOWED = {"opsdl_core/data/sources.py", "opsdl_core/data/tasks/curriculum.py", "opsdl_core/data/tasks/needle.py",
           "opsdl_core/data/examples.py"}


@pytest.fixture(scope="module")
def count():
    _, tok = build_tiny_model()
    return token_counter(tok)


def _ids(exs):
    return [(e.id, e.content_hash()) for e in exs]


def test_draw_is_the_generators_with_the_same_arguments(count):
    kw = dict(count_tokens=count, seed=stream_seed(3, "in_template"), n_distractors=(2, 4))
    got = draw("synthetic", split="heldout", n=3, lengths=[200], templates=TRAIN_TEMPLATES[:2], **kw)
    assert got.rejected == [] and len(got.examples) == 3
    assert _ids(got.examples) == _ids(generate_examples(n=3, split="heldout", target_tokens=200,
                                                        templates=TRAIN_TEMPLATES[:2], **kw))
    # no templates: the split's own (the held-out templates for "heldout")
    plain = draw("synthetic", split="heldout", n=2, lengths=[200], **kw).examples
    assert {e.metadata["template"] for e in plain} <= {t.name for t in HELDOUT_TEMPLATES}
    mix = {"families": {"kv_lookup": 1.0, "multi_hop": 1.0}, "haystacks": {"noise": 1.0}, "length_order": "ascending"}
    got = draw("curriculum", split="train", n=4, lengths=[160, 200], curriculum=mix, **kw).examples
    assert _ids(got) == _ids(generate_curriculum(n=4, split="train", families=mix["families"], lengths=[160, 200],
                                                 haystacks=mix["haystacks"], length_order="ascending", **kw))
    one = draw("curriculum", split="heldout", family="kv_lookup", n=2, lengths=[200], templates="all", **kw).examples
    assert _ids(one) == _ids(generate_family("kv_lookup", n=2, split="heldout", target_tokens=200, templates="all",
                                             **kw))


def test_a_file_source_is_loaded_with_its_bad_rows_named(tmp_path):
    row = {"id": "a", "long_context": "x The code is 7. y", "short_context": "The code is 7.",
           "question": "What is the code?", "answer": "7"}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "id": "b", "question": ""}) + "\n")
    assert not is_generated(str(path)) and is_generated("synthetic") and is_generated("curriculum")
    got = draw(str(path), split="train")
    assert [e.id for e in got.examples] == ["a"]
    assert len(got.rejected) == 1 and got.rejected[0].field == "question" and got.rejected[0].line == 2
    with pytest.raises(FileNotFoundError):
        draw(str(tmp_path / "missing.jsonl"), split="train")


def test_bad_draws_are_refused_with_what_was_expected(count):
    with pytest.raises(ValueError, match="one context length at a time"):
        draw("synthetic", split="train", n=1, lengths=[128, 256], count_tokens=count)
    with pytest.raises(ValueError, match="at least one context length and a token counter"):
        draw("synthetic", split="train", n=1, lengths=[128])
    with pytest.raises(ValueError, match=r"curriculum\['families'\]"):
        draw("curriculum", split="train", n=1, lengths=[128], count_tokens=count, curriculum={})
    with pytest.raises(ValueError, match=r"data.templates: unknown training template\(s\) \['nope'\]"):
        needle_templates(["nope"])
    with pytest.raises(ValueError, match="curation.templates"):
        needle_templates([], what="curation.templates")
    assert needle_templates(None) == TRAIN_TEMPLATES
    assert [t.name for t in needle_templates([TRAIN_TEMPLATES[1].name, TRAIN_TEMPLATES[1].name])] == \
        [TRAIN_TEMPLATES[1].name]


def test_no_other_module_chooses_examples_itself():
    """Every place that wants examples goes through draw(): a direct call of a generator or of the file
    loader anywhere else in the library, the assets or the pipelines fails here."""
    offenders = []
    for folder in ("opsdl_core", "assets", "pipelines", "evals"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in ALLOWED:
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
                if isinstance(node, ast.Call):
                    name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                    if name in DRAWERS:
                        offenders.append(f"{rel}:{node.lineno} {name}()")
    assert offenders == [], offenders
