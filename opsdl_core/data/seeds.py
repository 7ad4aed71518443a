"""The seed of every stream of generated examples, in one place.

Training prompts, held-out questions and evaluation suites are drawn from the same generators
(``tasks.needle``, ``tasks.curriculum``); each stream offsets the run's seed by its own large
prime multiple so that no two streams share a question, and a suite at another context length
adds the length. Every place that generates examples takes its seed from :func:`stream_seed`.
"""

from __future__ import annotations

__all__ = ["STREAMS", "stream_seed"]

STREAMS = {
    "train": 0,  # training prompts; also the held-out-template suites, whose templates no training row uses
    "in_template": 1_000_003,  # fresh keys of the training templates (the in-template held-out suites)
    "heldout": 7_000_003,  # held-out names: the curriculum's family suites, the experiment's in-family suites
    "transfer": 14_000_006,  # the experiment's transfer suites (templates never trained on)
}


def stream_seed(seed: int, stream: str, *, length: int = 0) -> int:
    """The seed of ``stream`` for a run seeded ``seed`` (``length``: a suite's context length, when its
    streams differ by length)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown example stream {stream!r}; expected one of {sorted(STREAMS)}")
    return seed + STREAMS[stream] + length
