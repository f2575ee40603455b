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
# Sampling divides the logits by the temperature and the repetition penalty, and guidance
# multiplies differences of log-probabilities, in float32: far beyond any useful value (at a
# temperature of 1e-6 sampling is greedy decoding already) these overflow into NaN, on which
# `generate` fails. So these factors stay within:
FACTORS = (1e-6, 1e6)
