"""Models and generation: loading (LoRA, the embedded default's cache, tiny test models), the GQA
attention function, rollouts (transformers and vLLM) and per-token scoring."""
