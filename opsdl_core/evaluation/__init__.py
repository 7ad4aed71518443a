"""Evaluation: greedy accuracy on suites, the per-token gap snapshot, and lm-eval runs (RULER,
LongBench v2, retention) with their per-length report."""
