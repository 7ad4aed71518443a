"""RULER's synthetic tasks, generated offline at lengths in the evaluated model's tokens."""
