"""Task generators: multi-key needles, curriculum families, prose haystacks, self-instruct questions
and the foreign-format retention suite."""
