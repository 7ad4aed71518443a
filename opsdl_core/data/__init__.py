"""Examples and where they come from: loading and checking rows, the synthetic and curriculum task
generators, the teacher's short context, chat prompts and the prepared (x_L, x_S) pairs."""
