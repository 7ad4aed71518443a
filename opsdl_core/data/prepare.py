"""From a data config to tokenized (x_L, x_S) prompt pairs ready for the trainer.

Examples come from the synthetic generator or from the user's files; each gets its teacher
context (oracle chunk, window, or BM25) and both chat prompts. An example whose teacher
context cannot be built (not in C_L, over budget) is set aside with its reason, like a bad
row, and never stops the others.

A file source is cleaned as curation cleans (:func:`opsdl_core.data.curation.clean_examples`):
exact duplicates are dropped before the held-out split, and training rows that overlap the
held-out ones (same content, or the same C_s + Q up to case and whitespace) are set aside.
Every prompt must fit the model's window (:func:`model_window`): text too long for it by its
character count is refused before it is tokenized, the rest once its chat prompt is built.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import DataConfig
from .curation import clean_examples, reject_example, too_many_chars
from .examples import Example, RejectedRow
from .prompts import chat_prompt_ids
from .seeds import stream_seed
from .short_context import (TeacherContext, TeacherContextError, build_teacher_context, check_teacher_context,
                            stored_teacher_context)
from .sources import draw, is_generated, needle_templates


@dataclass
class Prepared:
    example: Example
    teacher_context: TeacherContext
    student_ids: list[int]  # chat(C_L ⊕ Q)
    teacher_ids: list[int]  # chat(C_s ⊕ Q), C_s from the teacher-context builder


@dataclass
class PreparedData:
    train: list[Prepared]
    heldout: list[Prepared]
    rejected: list[RejectedRow] = field(default_factory=list)
    in_template: list[Prepared] = field(default_factory=list)  # held-out keys/seeds, training templates

    @property
    def digest(self) -> str:
        """Content digest of both splits (what a run trained and was evaluated on)."""
        h = hashlib.sha256()
        for split, items in (("train", self.train), ("heldout", self.heldout), ("in_template", self.in_template)):
            for p in items:
                h.update(f"{split}:{p.example.content_hash()}:{p.teacher_context.text}\n".encode())
        return h.hexdigest()[:16]


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


_UNSET_MAX_LENGTH = 10**9  # transformers' "unset" model_max_length is ~1e30


def _config_window(folder: Any) -> int | None:
    """``max_position_embeddings`` (or ``n_positions``/``n_ctx``; a ``text_config``'s first) of the
    model folder ``folder``'s ``config.json``, read as JSON only; ``None`` if there is none."""
    if not folder or not Path(str(folder)).is_dir():
        return None
    try:
        cfg = json.loads((Path(str(folder)) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for section in (cfg.get("text_config"), cfg):
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = section.get(key) if isinstance(section, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def model_window(tokenizer: Any) -> int | None:
    """The longest prompt the model takes, in tokens, without loading the model: the tokenizer's
    ``model_max_length``, capped by the position embeddings in the ``config.json`` of the folder
    it was loaded from; ``None`` when neither says."""
    limits = [getattr(tokenizer, "model_max_length", None), _config_window(getattr(tokenizer, "name_or_path", ""))]
    known = [int(v) for v in limits if isinstance(v, (int, float)) and 0 < v < _UNSET_MAX_LENGTH]
    return min(known) if known else None


def training_templates(cfg: DataConfig) -> tuple:
    """The synthetic training templates named in ``cfg.templates`` (all of them by default)."""
    return needle_templates(cfg.templates)


def _draw_args(cfg: DataConfig, tokenizer: Any, split: str) -> dict[str, Any]:
    """What a generated source draws ``split`` with: the training split takes the training templates (and the
    curriculum's own distractor range and length order), the held-out split every template of a family
    (synthetic: the held-out templates)."""
    kw: dict[str, Any] = dict(count_tokens=token_counter(tokenizer), seed=cfg.seed, lengths=[cfg.context_tokens],
                              n_distractors=tuple(cfg.n_distractors))
    if cfg.source == "synthetic":
        return {**kw, "templates": training_templates(cfg) if split == "train" else None}
    c = cfg.curriculum
    cur = dict(families=dict(c.families), haystacks=dict(c.haystacks), prose=c.prose)
    kw["lengths"] = c.lengths or [cfg.context_tokens]
    if split == "heldout":
        return {**kw, "curriculum": cur, "templates": "all"}
    return {**kw, "curriculum": {**cur, "length_order": c.length_order},
            "n_distractors": tuple(c.distractors or cfg.n_distractors)}


def load_raw(cfg: DataConfig, tokenizer: Any) -> tuple[list[Example], list[Example], list[RejectedRow]]:
    """Train and held-out examples before teacher contexts, plus rows set aside."""
    if not is_generated(cfg.source):
        return _load_files(cfg, model_window(tokenizer))
    train = draw(cfg.source, split="train", n=cfg.train_size, **_draw_args(cfg, tokenizer, "train")).examples
    heldout = draw(cfg.source, split="heldout", n=cfg.heldout_size,
                   **_draw_args(cfg, tokenizer, "heldout")).examples if cfg.heldout_size else []
    return train, heldout, []


def _load_clean(source: str, cfg: DataConfig, window: int | None) -> tuple[list[Example], list[RejectedRow]]:
    """The rows of ``source`` that load, without duplicates or text too long for ``window``."""
    loaded = draw(source, split="train", field_map=cfg.field_map)
    clean = clean_examples(loaded.examples, max_tokens=window, source=source)
    return clean.examples, loaded.rejected + clean.rejected


def _load_files(cfg: DataConfig, window: int | None) -> tuple[list[Example], list[Example], list[RejectedRow]]:
    """File sources: deduplicated, split (by ``heldout_source``, else by content hash), and
    training rows overlapping the held-out ones set aside."""
    pool, rejected = _load_clean(cfg.source, cfg, window)
    if cfg.heldout_source:
        held, held_rejected = _load_clean(cfg.heldout_source, cfg, window)
        rejected += held_rejected
        heldout = held[: cfg.heldout_size]
    else:  # one file source: a deterministic split by content hash
        heldout = sorted(pool, key=lambda e: e.content_hash())[: cfg.heldout_size]
        held_ids = {e.id for e in heldout}
        pool = [e for e in pool if e.id not in held_ids]
    train = clean_examples(pool, reference=heldout, ngram=None, reference_name="the held-out examples",
                           source=cfg.source)
    return train.examples[: cfg.train_size], heldout, rejected + train.rejected


def teacher_context_params(cfg: DataConfig) -> dict[str, int]:
    """The settings a C_s is built with besides its strategy and budget: a stored C_s built with
    others is built again."""
    return {"window_tokens": cfg.window_tokens, "bm25_chunk_tokens": cfg.bm25_chunk_tokens, "bm25_top_k": cfg.bm25_top_k}


def prepare_examples(examples: list[Example], tokenizer: Any, cfg: DataConfig, *,
                     answer_tokens: int = 0) -> tuple[list[Prepared], list[RejectedRow]]:
    """Each example's C_s and both chat prompts. A row that carries the C_s built for this strategy,
    budget and settings (``metadata.teacher_context``, as the ``teacher_contexts`` asset stores it, its
    checks having passed) is used as stored, after the same check; the others are built here. A C_s
    that cannot be built, a stored one that fails the check, or a student prompt longer than the
    model's window (:func:`model_window`; refused on its character count before any tokenizing when
    far too long; ``answer_tokens``: room kept in the window for the answer) sets the row aside with the
    reason, at the row it was loaded from."""
    count = token_counter(tokenizer)
    params = teacher_context_params(cfg)
    window = model_window(tokenizer)
    good, bad = [], []
    for i, ex in enumerate(examples):
        def set_aside(field: str, why: str) -> None:
            bad.append(reject_example(ex, i, field, f"example {ex.id}: {why}", source="examples"))

        too_long = too_many_chars(ex, window, " tokens of the model's window")
        if too_long:
            set_aside(*too_long)
            continue
        try:
            stored = stored_teacher_context(ex)
        except TeacherContextError as e:
            set_aside("metadata.teacher_context", str(e).removeprefix(f"example {ex.id}: "))
            continue
        if stored and stored[0].strategy == cfg.teacher_context and stored[1]["budget"] == cfg.short_budget_tokens \
                and stored[1].get("params", params) == params:
            ctx = stored[0]
            try:
                check_teacher_context(ctx, ex.long_context, max_tokens=cfg.short_budget_tokens, count_tokens=count)
            except TeacherContextError as e:
                set_aside("metadata.teacher_context", f"stored teacher context: {e}")
                continue
        else:
            try:
                ctx = build_teacher_context(ex, cfg.teacher_context, count_tokens=count,
                                            max_tokens=cfg.short_budget_tokens, window_tokens=cfg.window_tokens,
                                            chunk_tokens=cfg.bm25_chunk_tokens, top_k=cfg.bm25_top_k)
            except TeacherContextError as e:
                set_aside("short_context", str(e).removeprefix(f"example {ex.id}: "))
                continue
        student = chat_prompt_ids(tokenizer, ex.long_context, ex.question)
        if window and len(student) + answer_tokens > window:
            room = f" with room for a {answer_tokens}-token answer" if answer_tokens else ""
            set_aside("long_context", f"the student prompt chat(C_L + Q) has {len(student)} tokens; expected at "
                                      f"most {window - answer_tokens} (the model's window of {window}{room})")
            continue
        good.append(Prepared(ex, ctx, student, chat_prompt_ids(tokenizer, ctx.text, ex.question)))
    return good, bad


def prepare_data(cfg: DataConfig, tokenizer: Any, *, answer_tokens: int = 0) -> PreparedData:
    """The training, held-out and in-template examples of ``cfg``, prepared; ``answer_tokens``: room each
    prompt must leave in the model's window for its answer (the trainer's ``rollout.max_new_tokens``)."""
    train_raw, held_raw, rejected = load_raw(cfg, tokenizer)
    train, bad_train = prepare_examples(train_raw, tokenizer, cfg, answer_tokens=answer_tokens)
    heldout, bad_held = prepare_examples(held_raw, tokenizer, cfg, answer_tokens=answer_tokens)
    in_template: list[Prepared] = []
    if cfg.source == "synthetic" and cfg.in_template_size:
        kw = {**_draw_args(cfg, tokenizer, "train"), "seed": stream_seed(cfg.seed, "in_template")}
        raw = draw("synthetic", split="heldout", n=cfg.in_template_size, **kw).examples
        in_template, bad = prepare_examples(raw, tokenizer, cfg, answer_tokens=answer_tokens)
        bad_held += bad
    if not train:
        reasons = "; ".join(r.reason for r in (rejected + bad_train)[:3])
        raise ValueError(f"no usable training examples in {cfg.source!r}" + (f" (e.g. {reasons})" if reasons else ""))
    return PreparedData(train, heldout, rejected + bad_train + bad_held, in_template)


def other_context_prompts(items: list[Prepared], tokenizer: Any) -> list[list[int]]:
    """The ``other_context`` control's teacher prompts: item ``i`` gets chat(C_s of another item ⊕
    its own Q), the other item being the next one (cyclically) whose C_s text differs from its own.
    Deterministic; the teacher then reads evidence of the same shape and length that does not answer
    the question (is it the evidence that helps, or only a shorter prompt?).

    Raises:
        ValueError: fewer than two distinct teacher contexts among ``items``.
    """
    texts = [p.teacher_context.text for p in items]
    if len(set(texts)) < 2:
        raise ValueError(f"loss.control 'other_context' needs at least two training examples with different "
                         f"teacher contexts; got {len(items)} example(s) with {len(set(texts))} distinct one(s)")
    out = []
    n = len(items)
    for i, p in enumerate(items):
        j = next((i + k) % n for k in range(1, n) if texts[(i + k) % n] != texts[i])
        out.append(chat_prompt_ids(tokenizer, texts[j], p.example.question))
    return out


def step_prompts(n: int, train: Any, *, step: int, micro: int, ranks: int = 1, rank: int = 0) -> list[int]:
    """The prompts (indices among ``n``) that micro-batch ``micro`` of optimizer step ``step`` takes on process
    ``rank`` of ``ranks``: each rank its own slice of one seeded order (``prompt_order``), so one process
    with ``grad_accum`` micro-batches and ``ranks`` processes with fewer take the same prompts."""
    k = train.prompts_per_step
    base = ((step * train.grad_accum + micro) * ranks + rank) * k
    return [prompt_order(n, train.seed, base + j, train.prompt_order) for j in range(k)]


def prompt_order(n: int, seed: int, cursor: int, order: str = "shuffle") -> int:
    """The example index at data position ``cursor``: a fresh seeded permutation per epoch
    (``order="sequential"``: the data's own order, epoch after epoch)."""
    epoch, pos = divmod(cursor, n)
    if order == "sequential":
        return pos
    perm = list(range(n))
    random.Random(f"{seed}:epoch:{epoch}").shuffle(perm)
    return perm[pos]
