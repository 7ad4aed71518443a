#!/bin/bash
cd /work/main
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
/usr/bin/time -v .venv/bin/python -m opsdl_core.experiment --config configs/transfer.yaml \
  --set experiment.out_dir=/work/runs/loo --set experiment.db=/work/runs/loo/lineage.duckdb \
  --set experiment.eval_n=32 --set experiment.in_family_n=16 \
  --set experiment.protocol=leave_one_out --set "experiment.heldout_families=[event_date]" \
  --set run.train.steps=144 --set run.data.train_size=144 \
  --set "run.data.curriculum.families={comparison: 0.0, counting: 0.0}" \
  --set "run.data.curriculum.lengths=[256,512,1024]" --set "run.data.curriculum.distractors=[1,4]" \
  --set run.loss.kind=forward_kl --set run.loss.short_anchor=1.0 > /work/runs/loo.log 2>&1
