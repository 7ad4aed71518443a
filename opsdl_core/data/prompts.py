"""Student and teacher prompts: one chat template, one question wording, two contexts.

``x_L = chat(C_L ⊕ Q)`` and ``x_S = chat(C_s ⊕ Q)`` differ only in the context, so the
log-prob gap between them measures what the long context costs the model.
"""

from __future__ import annotations

from typing import Any

USER_TEMPLATE = "{context}\n\nAnswer the question using the text above. Question: {question}"


def user_message(context: str, question: str) -> str:
    return USER_TEMPLATE.format(context=context, question=question)


def chat_prompt_ids(tokenizer: Any, context: str, question: str, system: str | None = None) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the assistant turn's header."""
    messages = [{"role": "user", "content": user_message(context, question)}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return [int(i) for i in ids]
    # Base models without a template: plain text, same wording for both prompts.
    return list(tokenizer(user_message(context, question) + "\nAnswer:", add_special_tokens=True)["input_ids"])


def pad_token_id(tokenizer: Any) -> int:
    """The id used to pad batches: the tokenizer's pad token, else its eos token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an eos token")
    return int(pad)


def stop_token_ids(tokenizer: Any, model_config: Any = None) -> tuple[int, ...]:
    """Token ids that end an assistant turn: eos, plus the config's eos ids."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(model_config, "eos_token_id", None) if model_config is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    if not ids:
        raise ValueError("the tokenizer has no eos token: cannot tell where an answer ends")
    return tuple(sorted(ids))
