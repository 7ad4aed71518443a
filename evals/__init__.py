"""Evaluation suites run through lm-evaluation-harness: RULER (per context length), LongBench v2,
and short-context retention. ``opsdl_core.evaluation.accuracy`` holds the held-out synthetic accuracy used
by the trainer's demo."""
