"""One function chooses the examples of a source: :func:`draw`.

A source is ``"synthetic"`` (the multi-key needle generator, ``tasks.needle``), ``"curriculum"`` (the
task families, ``tasks.curriculum``) or a file or folder of your rows (``examples.load_examples``).
Training prompts (``prepare.load_raw``, ``curation.curate``), held-out questions and every evaluation
suite (``curation.eval_suites``, ``experiment.suites``) are drawn through it, each with the seed of its
stream (``seeds.stream_seed``): the switch over sources is here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

from .examples import LoadResult, load_examples

__all__ = ["GENERATED", "draw", "is_generated", "needle_templates"]

GENERATED = ("synthetic", "curriculum")  # sources made by a generator; any other is a file or folder


def is_generated(source: str) -> bool:
    return source in GENERATED


def needle_templates(names: Sequence[str] | None, *, what: str = "data.templates") -> tuple:
    """The needle generator's training templates named in ``names`` (``None``: all of them), in the order
    given, each once; an unknown or empty list is refused naming ``what``."""
    from .tasks.needle import TRAIN_TEMPLATES

    if names is None:
        return TRAIN_TEMPLATES
    known = {t.name: t for t in TRAIN_TEMPLATES}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"{what}: unknown training template(s) {unknown}; expected names from {sorted(known)}")
    return tuple(known[n] for n in dict.fromkeys(names))


def draw(source: str, *, split: str, n: int = 0, count_tokens: Callable[[str], int] | None = None, seed: int = 0,
         lengths: Sequence[int] = (), templates: Any = None, n_distractors: Sequence[int] = (4, 12),
         curriculum: Mapping[str, Any] | None = None, family: str | None = None, haystack: str = "noise",
         field_map: Mapping[str, str] | None = None) -> LoadResult:
    """The examples of ``source`` for ``split`` ("train" or "heldout"), with the rows set aside.

    - ``"synthetic"``: ``n`` needle examples whose C_L has ``lengths[0]`` tokens (one length), written with
      ``templates`` (``Template`` objects; ``None``: the split's own, the held-out templates for "heldout").
    - ``"curriculum"``: ``n`` examples mixed by ``curriculum`` (``families``, ``haystacks``,
      ``length_order``, ``prose`` of ``CurriculumConfig``) over ``lengths`` in equal shares; or, with
      ``family``, ``n`` of that family alone at ``lengths[0]`` on ``haystack``. ``templates``: "split"
      (the split's own), "train", "heldout" or "all".
    - anything else: every row of that file or folder (``n`` and the generator arguments unused), bad rows
      in ``rejected`` naming their file, row and field.
    """
    if not is_generated(source):
        return load_examples(source, field_map=field_map)
    if not lengths or count_tokens is None:
        raise ValueError(f"source {source!r}: expected at least one context length and a token counter")
    lo_hi = tuple(n_distractors)
    if source == "synthetic":
        from .tasks.needle import generate_examples

        if len(lengths) != 1:
            raise ValueError(f"source 'synthetic' draws one context length at a time, got {list(lengths)}")
        kw = {"templates": templates} if templates is not None else {}
        return LoadResult(generate_examples(n=n, split=split, target_tokens=lengths[0], count_tokens=count_tokens,
                                            seed=seed, n_distractors=lo_hi, **kw), [])
    from .tasks.curriculum import generate_curriculum, generate_family

    c = dict(curriculum or {})
    prose = c.get("prose", "python-reference")
    tpl = templates if templates is not None else "split"
    if family is not None:
        return LoadResult(generate_family(family, n=n, split=split, target_tokens=lengths[0],
                                          count_tokens=count_tokens, seed=seed, haystack=haystack,
                                          n_distractors=lo_hi, templates=tpl, prose=prose), [])
    if not c.get("families"):
        raise ValueError("source 'curriculum': expected curriculum['families'], a family -> weight mixture")
    return LoadResult(generate_curriculum(n=n, split=split, families=c["families"], lengths=list(lengths),
                                          count_tokens=count_tokens, seed=seed, haystacks=c.get("haystacks"),
                                          n_distractors=lo_hi, length_order=c.get("length_order", "mixed"),
                                          templates=tpl, prose=prose), [])
