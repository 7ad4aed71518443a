"""Tests for opsdl_core.models.load: the tiny model, resolving model specs and loading them.
The embedded default's download and conversion are in tests/test_model_cache.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from model_helpers import SAMPLE
from model_helpers import logits as _logits

from opsdl_core.models.load import (EMBEDDED_DEFAULT, ResolvedModel, folder_content_hash, load_model_and_tokenizer,
                                    resolve_model)
from opsdl_core.models.tiny import build_tiny_model, save_tiny_model


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
