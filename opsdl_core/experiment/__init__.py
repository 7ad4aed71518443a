"""Experiments: the plan (settings, variants, runs), the suites and their evaluation, the run (python
-m opsdl_core.experiment) and the comparison report."""
