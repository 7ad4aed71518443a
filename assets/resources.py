"""Resources shared by the OPSDL assets: where things live, which model, the lineage store."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable

import dagster as dg
from pydantic import Field

from opsdl_core.lineage.store import LineageStore

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _code_version() -> str:
    """The assets' Dagster code version: the package version and a digest of the library's and the
    assets' source (every ``.py`` under ``opsdl_core/`` and ``assets/``), so a change of the code an
    asset runs marks it changed in the UI and is recorded beside its lineage rows."""
    import hashlib

    import opsdl_core

    h = hashlib.sha256()
    for pkg in (Path(opsdl_core.__file__).parent, Path(__file__).parent):
        for f in sorted(pkg.rglob("*.py")):
            h.update(f.relative_to(pkg.parent).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return f"{opsdl_core.__version__}+{h.hexdigest()[:12]}"


CODE_VERSION = _code_version()


# Steps that load a model or tokenize a data set carry this tag; the main job's run config allows
# one of them at a time (tag_concurrency_limits) while the light asset checks run beside them.
HEAVY = {"opsdl/cpu": "heavy"}
# ... and belong to this concurrency pool: across runs (the weekly schedule, the inbox sensor and a
# run started by hand), an instance that sets a limit (`dagster instance concurrency set opsdl_cpu 1`)
# runs one of them at a time. Within a run the tag limit above does it without instance settings.
CPU_POOL = "opsdl_cpu"
OWNERS = ["team:opsdl"]


def run_config_field(path: str, **kw: Any) -> Any:
    """A Launchpad field that is a run-config field (``"data.short_budget_tokens"``): its default and its
    help come from RunConfig, where they are declared once."""
    from opsdl_core.config_reference import field_default, field_help

    default = field_default(path)
    return Field(default=list(default) if isinstance(default, tuple) else default,
                 description=f"{field_help(path)} ({path})", **kw)


def default_home() -> str:
    """``$OPSDL_HOME``, else ``var/`` under the current directory (the project root for ``dagster dev``)."""
    return os.environ.get("OPSDL_HOME", str(Path("var").resolve()))


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str, cache_dir: str | None) -> Any:
    from opsdl_core.models.load import load_tokenizer

    return load_tokenizer(model, cache_dir=cache_dir)


class OpsdlResource(dg.ConfigurableResource):
    """The project folder, the base model and the lineage database of every OPSDL asset."""

    home: str = Field(default_factory=default_home,
                      description="Folder for artifacts, runs, the data inbox and the lineage DuckDB file.")
    model: str = Field(default="smollm2-135m-instruct",
                       description="Base model: 'smollm2-135m-instruct' (embedded, offline), a local "
                                   "transformers folder, or a hub id.")
    model_cache_dir: str | None = Field(default=None, description="Cache for the converted embedded model "
                                                                  "(default $OPSDL_CACHE_DIR or ~/.cache/opsdl).")
    num_threads: int = Field(default=2, description="torch CPU threads for in-process work (curation, eval).")
    lineage_db: str | None = Field(default=None, description="DuckDB lineage file (default HOME/lineage.duckdb).")
    accelerate_config: str | None = Field(
        default=None, description="Launch the training process with `accelerate launch --config_file THIS` "
                                  "(e.g. configs/accelerate/fsdp.yaml on 8 GPUs); default: one plain Python process.")

    def train_command(self, module: str) -> list[str]:
        """The command that starts the training process ``python -m module`` (through accelerate if configured)."""
        if not self.accelerate_config:
            return [sys.executable, "-m", module]
        cfg = Path(self.accelerate_config).expanduser()
        if not cfg.is_absolute():
            cfg = PROJECT_ROOT / cfg
        if not cfg.is_file():
            raise FileNotFoundError(f"opsdl resource accelerate_config: no file at {cfg}")
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "-m", module]

    # -- paths ------------------------------------------------------------------------------
    @property
    def home_path(self) -> Path:
        p = Path(self.home).expanduser().resolve()
        p.mkdir(parents=True, exist_ok=True)
        return p

    def artifacts(self, *parts: str) -> Path:
        """``OPSDL_HOME/artifacts/<parts>``, created; a part that would leave that folder is refused."""
        for part in parts:
            if not part or part in (".", "..") or "/" in part or "\\" in part or "\0" in part:
                raise ValueError(f"artifact folder name {part!r}: expected one folder name (no '/', '..' or NUL)")
        p = self.home_path.joinpath("artifacts", *parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def inbox(self) -> Path:
        p = self.home_path / "inbox"
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def db_path(self) -> Path:
        return Path(self.lineage_db) if self.lineage_db else self.home_path / "lineage.duckdb"

    def store(self) -> LineageStore:
        return LineageStore(self.db_path)

    # -- model ------------------------------------------------------------------------------
    def tokenizer(self) -> Any:
        return _tokenizer(self.model, self.model_cache_dir)

    def count_tokens(self) -> Callable[[str], int]:
        from opsdl_core.data.prepare import token_counter

        return token_counter(self.tokenizer())

    def model_path(self) -> str:
        """The base model as a path (the embedded default's converted folder, a local folder) or a hub id."""
        from opsdl_core.models.load import resolve_model

        return resolve_model(self.model, cache_dir=self.model_cache_dir).path

    def load_model(self, path: str | None = None) -> tuple[Any, Any]:
        """``(model, tokenizer)``: the base model, or a trained model folder when ``path`` is given."""
        import torch

        from opsdl_core.models.load import load_model_and_tokenizer

        torch.set_num_threads(self.num_threads)
        return load_model_and_tokenizer(path or self.model, cache_dir=self.model_cache_dir)
