"""The NSMC task: reviews written on request for a polarity (generation.py), polarity
accuracy (polarity.py), the independent judge of the reviews written (judge.py), and the
evaluation hook the loop calls (nsmc.py)."""

# How reviews are sampled: generate.py's defaults, and train.py's samples. (Standard library
# only here: the command lines read these before torch loads.)
SAMPLING = dict(max_new_tokens=40, top_k=50, top_p=0.92, temperature=0.9,
                repetition_penalty=1.2, no_repeat_ngram_size=3)
# Classifier-free guidance: each token's log-probabilities given the requested polarity word
# are pushed away from those given the other word, by this factor (1: off). Chosen by
# measurement (benchmarks/polarity_control.py, docs/generation.md).
GUIDANCE = 2.0
