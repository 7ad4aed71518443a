"""``opsdl data``: build training data files from the curriculum or from the user's documents.

    opsdl data curriculum --out var/data/curriculum.jsonl --n 256 --lengths 512,1024 \\
        [--families kv_lookup=2,counting=1] [--haystacks noise=1,prose=1] [--split train] [--seed 0]
    opsdl data self-instruct DOCS_FOLDER --out var/data/self_instruct.jsonl [--model NAME] \\
        [--target-tokens 1024] [--chunks-per-document 8]
    opsdl data prose-docs OUT_FOLDER        # the built-in long documents (Python reference, PSF licence)

Every file can be a training source (``data.source: FILE``) or a curation source. The
self-instruct run also writes ``<out>.attempts.jsonl`` (every chunk asked, its question, the
model's answers and why it was dropped) and ``<out>.stats.json`` (documents, questions written,
kept, by outcome).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


def _weights(text: str | None, what: str) -> dict[str, float] | None:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        name, _, w = part.partition("=")
        try:
            out[name.strip()] = float(w) if w else 1.0
        except ValueError:
            raise SystemExit(f"opsdl data: --{what} {text!r}: expected NAME=WEIGHT[,NAME=WEIGHT...]") from None
    return out


def _tokenizer(model: str):
    from ..models.load import load_model_and_tokenizer, resolve_model

    return load_model_and_tokenizer(resolve_model(model))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="opsdl data", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("curriculum", help="write curriculum examples (JSONL)")
    c.add_argument("--out", required=True, type=Path)
    c.add_argument("--n", type=int, default=256)
    c.add_argument("--split", choices=("train", "heldout"), default="train")
    c.add_argument("--families", help="mixture NAME=WEIGHT,... (default: every family, equal)")
    c.add_argument("--haystacks", help="NAME=WEIGHT,... among noise, prose, records (default: noise)")
    c.add_argument("--lengths", default="1024", help="context lengths in tokens, comma-separated")
    c.add_argument("--length-order", choices=("mixed", "ascending"), default="mixed")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer measures the lengths")
    s = sub.add_parser("self-instruct", help="questions written by the model about your documents (JSONL)")
    s.add_argument("docs", type=Path, help="folder of long .txt/.md files")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--model", default="smollm2-135m-instruct")
    s.add_argument("--target-tokens", type=int, default=1024)
    s.add_argument("--chunk-tokens", type=int, default=128)
    s.add_argument("--chunks-per-document", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=None)
    p = sub.add_parser("prose-docs", help="write the built-in long documents as a folder of .txt files")
    p.add_argument("out", type=Path)
    p.add_argument("--min-chars", type=int, default=6000)
    args = ap.parse_args(argv)

    from .writers import write_jsonl

    if args.cmd == "prose-docs":
        from .tasks.prose import write_documents

        paths = write_documents(args.out, min_chars=args.min_chars)
        print(f"wrote {len(paths)} documents to {args.out}")
        return 0
    if args.cmd == "curriculum":
        from .prepare import token_counter
        from .sources import draw
        from .tasks.curriculum import family_names

        _, tok = _tokenizer(args.model)
        mix = dict(families=_weights(args.families, "families") or {f: 1.0 for f in family_names()},
                   haystacks=_weights(args.haystacks, "haystacks"), length_order=args.length_order)
        exs = draw("curriculum", split=args.split, n=args.n, curriculum=mix, count_tokens=token_counter(tok),
                   lengths=[int(x) for x in args.lengths.split(",")], seed=args.seed).examples
        write_jsonl(exs, args.out)
        print(f"wrote {len(exs)} examples to {args.out}")
        return 0
    import torch

    from .tasks.self_instruct import SelfInstructSettings, load_documents, self_instruct

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = _tokenizer(args.model)
    model.eval()
    settings = SelfInstructSettings(target_tokens=args.target_tokens, chunk_tokens=args.chunk_tokens,
                                    chunks_per_document=args.chunks_per_document, seed=args.seed)
    with torch.no_grad():
        res = self_instruct(load_documents(args.docs), model, tok, settings=settings,
                            log=lambda m: print(m, file=sys.stderr, flush=True))
    write_jsonl(res.examples, args.out)
    attempts = args.out.with_suffix(".attempts.jsonl")
    attempts.write_text("".join(json.dumps(a, default=str) + "\n" for a in res.attempts))
    args.out.with_suffix(".stats.json").write_text(json.dumps(res.stats, indent=1))
    print(json.dumps(res.stats, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
