"""Tiny, deterministic Llama models with a locally trained tokenizer, for fast tests.

Built offline in about a second: a byte-level BPE trained on a small built-in corpus (any text
encodes), SmolLM2's special tokens and ChatML chat template, and a seeded random ``LlamaForCausalLM``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .attention import use_gqa_attention
from .cache import CHATML_TEMPLATE, ENDOFTEXT, IM_END, IM_START, _fix_token_ids
from .linear import use_cpu_linear

__all__ = ["build_tiny_model", "save_tiny_model"]

_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Sphinx of black quartz, judge my vow! How vexingly quick daft zebras jump.
THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG. Jackdaws love my big sphinx of quartz.
Digits: 0 1 2 3 4 5 6 7 8 9. Numbers like 42, 3.14159, 2024-05-17, 10:30, 1,000,000 and -7.5e3.
Punctuation: . , ; : ! ? ' " ( ) [ ] { } < > / \\ | @ # $ % ^ & * _ - + = ~ `
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of
foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light.
Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing
to do: once or twice she had peeped into the book her sister was reading, but it had no pictures
or conversations in it, "and what is the use of a book," thought Alice, "without pictures or
conversations?"
Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my
purse, and nothing particular to interest me on shore, I thought I would sail about a little and
see the watery part of the world.
Question: What is the capital of France? Answer: The capital of France is Paris.
Question: What is the capital of Germany? Answer: The capital of Germany is Berlin.
Question: What is 2 + 2? Answer: 2 + 2 = 4. Question: What is 12 * 12? Answer: 144.
The document says that the secret code is 7319. Read the passage and answer the question.
Long documents contain many paragraphs; the model must find the relevant sentence and quote it.
The meeting was moved from Monday to Wednesday because the room was booked by another team.
In the year 1969, astronauts landed on the Moon. Water boils at 100 degrees Celsius at sea level.
def add(a, b):
    return a + b
for i in range(10):
    print(i, i * i)
{"name": "Ada", "age": 36, "skills": ["math", "poetry"], "active": true, "score": null}
Email: someone@example.com, URL: https://example.org/path?query=1&page=2#section
user: Can you summarize the text above? assistant: Sure. The text describes a journey by sea.
system: You are a helpful assistant. user: Hello! assistant: Hi, how can I help you today?
She said, "I'll be there at 5 o'clock," but he didn't believe her; they'd heard that before.
We're sure you've seen it: they're here, it's late, and I'm tired. Don't worry, we'll manage.
Once upon a time there was a little girl who lived in a village near the forest. Whenever she
went out, the little girl wore a red riding cloak, so everyone in the village called her Little
Red Riding Hood. One morning, her mother asked her to take some bread to her grandmother.
Science, history, geography, music, art, language, reading, writing, counting, thinking.
January February March April May June July August September October November December
Monday Tuesday Wednesday Thursday Friday Saturday Sunday. North South East West.
red orange yellow green blue indigo violet black white gray brown pink purple gold silver
one two three four five six seven eight nine ten eleven twelve twenty thirty hundred thousand
"""


def _train_tiny_tokenizer(corpus: str, vocab_size: int, model_max_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],  # ids 0, 1, 2 as in SmolLM2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = corpus.splitlines(keepends=True) * 2  # repeat so single occurrences reach min_frequency
    backend.train_from_iterator(lines, trainer=trainer, length=len(lines))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=IM_START,
        eos_token=IM_END,
        unk_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        chat_template=CHATML_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(*, seed: int = 0, vocab_corpus: str | None = None, hidden_size: int = 64,
                     num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                     max_position_embeddings: int = 4096, vocab_size: int = 1000):
    """A tiny randomly initialised ``LlamaForCausalLM`` and a matching tokenizer, built offline.

    The tokenizer is a byte-level BPE (any text encodes) trained on a small built-in corpus (or
    *vocab_corpus*), with ``<|endoftext|>``=0, ``<|im_start|>``=1 (bos), ``<|im_end|>``=2 (eos),
    pad = ``<|endoftext|>`` and SmolLM2's ChatML chat template. The same arguments always give the
    same vocabulary and weights; the global torch RNG is left untouched.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tiny_tokenizer(vocab_corpus if vocab_corpus is not None else _TINY_CORPUS,
                                      vocab_size, max_position_embeddings)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.to(torch.float32)
    use_gqa_attention(model)  # as load_model_and_tokenizer does: tests run the attention and the linear layers
    use_cpu_linear(model)  # every load uses
    _fix_token_ids(model, tokenizer)
    model.eval()
    return model, tokenizer


def save_tiny_model(folder: str | os.PathLike, **kw) -> Path:
    """Build a tiny model (``**kw`` as for :func:`build_tiny_model`) and save it as a standard folder."""
    folder = Path(folder)
    model, tokenizer = build_tiny_model(**kw)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
