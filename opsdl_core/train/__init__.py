"""Training: the trainer (OPSDL, Long-SFT, DPO), its process entry (python -m opsdl_core.train),
losses, the teacher's weights, baseline data and checkpoints."""
