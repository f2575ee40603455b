"""Where and how the loop runs: the backends (CPU, one GPU, every XLA device, torchrun's
processes), launching and signals, checkpoints and the run directory, and reporting. The
loop in train.py calls them; none of them imports train.py."""
