"""The DuckDB lineage store: its schema and views, and the writers and readers of runs, checkpoints,
datasets and scores."""
