#!/usr/bin/env bash
# The self-instruct path end to end on the embedded default (SmolLM2-135M-Instruct):
#   1. a folder of long text files (default: the built-in Python reference documents, PSF licence;
#      pass your own folder as $1), split by file into training documents (3 of 4) and held-out ones;
#   2. the model writes questions about chunks of each document, filtered (opsdl_core.data.tasks.self_instruct);
#   3. OPSDL trains on the training documents' questions and is evaluated on the held-out ones'.
#   scripts/self_instruct.sh [DOCS_FOLDER]
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
out=var/self-instruct
mkdir -p "$out/train_docs" "$out/heldout_docs"
docs="${1:-$out/docs}"
[ -n "${1:-}" ] || .venv/bin/opsdl data prose-docs "$docs"
i=0
for f in $(ls "$docs" | grep -E '\.(txt|md|rst)$' | sort); do
  i=$((i + 1))
  if [ $((i % 4)) -eq 0 ]; then cp "$docs/$f" "$out/heldout_docs/"; else cp "$docs/$f" "$out/train_docs/"; fi
done
.venv/bin/opsdl data self-instruct "$out/train_docs" --out "$out/train.jsonl" --chunks-per-document 40 --threads 2
.venv/bin/opsdl data self-instruct "$out/heldout_docs" --out "$out/heldout.jsonl" --chunks-per-document 40 \
  --threads 2 --seed 1
.venv/bin/python -m opsdl_core.train --config configs/self-instruct.yaml
