"""Which contexts each evaluation suite is asked in: one rule for the pipeline's evaluation, the
experiments and ``python -m opsdl_core.train``.

A suite has a *role*:

* ``heldout``: questions the training never saw (held-out templates, names or families). Asked with
  the long context C_L, and with C_s only on its family's longest suite: C_s does not depend on
  the context length, so one C_s-only pass per family measures the short-context skill;
* ``in_template``: fresh keys of the training templates. Asked with C_L only (its C_s-only pass
  would repeat the training's own short-context task);
* ``retention``: short-context questions in formats the training never uses. Asked with C_s only.

With ``short=False`` (an intermediate checkpoint, say) only the long-context passes are run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["ROLES", "eval_passes"]

ROLES = ("heldout", "in_template", "retention")
S = TypeVar("S")


def eval_passes(suites: Sequence[S], *, role: Callable[[S], str], family: Callable[[S], str] = lambda s: "",
                length: Callable[[S], int] = lambda s: 0, short: bool = True) -> list[tuple[S, str]]:
    """``(suite, "long" | "short")`` for every pass the rule above asks for, in the suites' order
    (a suite's long pass before its short one)."""
    roles = {id(s): role(s) for s in suites}
    bad = sorted({r for r in roles.values() if r not in ROLES})
    if bad:
        raise ValueError(f"unknown evaluation suite role(s) {bad}; expected one of {list(ROLES)}")
    longest: dict[str, S] = {}
    for s in suites:
        if roles[id(s)] == "heldout" and (family(s) not in longest or length(s) >= length(longest[family(s)])):
            longest[family(s)] = s
    out: list[tuple[S, str]] = []
    for s in suites:
        r = roles[id(s)]
        if r != "retention":
            out.append((s, "long"))
        if short and (r == "retention" or (r == "heldout" and longest[family(s)] is s)):
            out.append((s, "short"))
    return out
