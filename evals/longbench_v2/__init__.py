"""LongBench v2 (THUDM) with the official generation protocol, from a local ``data.json``."""
