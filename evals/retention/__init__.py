"""Short-context retention: does the long-context-trained model keep its short-context skills?

Two parts, both run through lm-evaluation-harness (``python -m lm_eval``):

1. The standard benchmarks with lm-eval's own task definitions (MMLU, ARC-Challenge,
   HellaSwag, Winogrande). Machines here are offline, so the data comes either from the
   ``datasets`` cache (``python -m evals.retention.offline`` says which; then the plain lm-eval
   names ``mmlu,arc_challenge,hellaswag,winogrande`` work with ``HF_DATASETS_OFFLINE=1``) or from
   files in the data sets' own column formats, for which ``python -m evals.retention.write_tasks``
   validates the files and writes tasks ``opsdl_retention_<bench>`` and the group
   ``opsdl_retention`` into a folder for ``--include_path`` (``benchmarks``: formats and checks).
2. ``opsdl_short_cs`` (``tasks/``, logic in ``short_cs``): the synthetic needle questions asked
   with their relevant context C_s only, scored as the pipeline's evaluation scores them; needs no
   data at all; its text is the raw user message, so run it WITH ``--apply_chat_template`` (lm-eval
   applies the model's chat template, giving the pipeline's teacher prompt). The group
   ``opsdl_short`` adds the RULER tasks at the lengths given in ``--metadata max_seq_lengths`` (run
   with ``--include_path evals`` and ``--apply_chat_template``).
"""
