"""The run config described: each field's help and default by dotted path (the Launchpad's
descriptions come from here) and ``docs/configuration.md``, generated from the dataclasses
(``opsdl config reference``)."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Union, get_args, get_origin

from .config import RunConfig

__all__ = ["field_help", "field_default", "reference_markdown", "section_types"]


def field_help(path: str) -> str:
    """The help of a run-config field by its dotted path (``"optim.lr"``, ``"rollout.vllm.kv_cache_gib"``)."""
    cls: Any = RunConfig
    *sections, name = path.split(".")
    for s in sections:
        cls = section_types(cls)[s]
    f = {f.name: f for f in dataclasses.fields(cls)}.get(name)
    if f is None:
        raise KeyError(f"{path}: not a run-config field")
    return f.metadata.get("help", "")


def field_default(path: str) -> Any:
    """The library's default of a run-config field by its dotted path (the one place defaults live)."""
    obj: Any = RunConfig()
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def section_types(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        tp = next((a for a in get_args(tp) if dataclasses.is_dataclass(a)), tp) if get_origin(tp) is Union else tp
        if dataclasses.is_dataclass(tp):
            out[f.name] = tp
    return out


def reference_markdown() -> str:
    """``docs/configuration.md``: every run-config field with its type, default and help, by section,
    generated from the dataclasses (``opsdl config reference``; a test keeps the committed page in step)."""
    lines = ["# Configuration reference", "",
             "Generated from `opsdl_core/config.py` by `.venv/bin/opsdl config reference > docs/configuration.md`;",
             "do not edit by hand. Every field of a run config (the YAML given to `python -m opsdl_core.train",
             "--config`, the `run` section of an experiment, the Launchpad's `run_config_file`) with its default;",
             "any of them can be set on a command line with `--set SECTION.FIELD=VALUE` or in the Launchpad's",
             "`overrides`. Fields marked *not hashed* cannot change what a run computes and are left out of its",
             "config hash.", ""]
    hints_of = typing.get_type_hints

    def walk(cls: type, prefix: str, obj: Any) -> None:
        hints = hints_of(cls)
        rows, subs = [], []
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            sub = section_types(cls).get(f.name)
            if sub is not None:
                subs.append((sub, f"{prefix}{f.name}.", value if value is not None else sub()))
                if value is not None:
                    continue
            tp = hints[f.name]
            tp = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "").replace("NoneType", "None")
            tp = tp.replace("opsdl_core.config.", "")
            default = json.dumps(value if not dataclasses.is_dataclass(value) else None)
            note = "" if f.metadata.get("hash", True) else " *Not hashed.*"
            what = f.metadata.get("help", "").replace("|", "\\|")
            rows.append(f"| `{prefix}{f.name}` | `{tp}` | `{default}` | {what}{note} |")
        if rows:
            lines.extend([f"## `{prefix.rstrip('.')}`", "", (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " "), "",
                          "| field | type | default | what |", "|---|---|---|---|", *rows, ""])
        for sub, pre, val in subs:
            walk(sub, pre, val)

    for f in dataclasses.fields(RunConfig):
        walk(section_types(RunConfig)[f.name], f"{f.name}.", getattr(RunConfig(), f.name))
    return "\n".join(lines)
