"""What the model tests share: a text for tokenizer round trips, a model's logits, a silent log."""

from __future__ import annotations

import torch

# mixed text for tokenizer round trips: digits, accents, symbols, emoji, tabs and newlines
SAMPLE = "Hello world! In 2024 the café costs $12.50 (about 11 €) 🙂\n\tdef f(x): return x**2"


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def quiet(_msg: str) -> None:
    pass
