"""Peak host memory (RSS) of each process while --fsdp loads and shards a model: read once
by process 0 and sent to the others (what train.py --fsdp does), or read by every process.

    torchrun --nproc_per_node 2 benchmarks/load_once.py --pretrained_model_name DIR
    torchrun --nproc_per_node 2 benchmarks/load_once.py --pretrained_model_name DIR --every_process

Each process prints one line: its rank and its peak RSS (VmHWM) in MiB once the model is
sharded. On the CPU (gloo).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules

from options import ArgumentParser  # noqa: E402


def peak_rss_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained_model_name", required=True, help="a model directory")
    p.add_argument("--every_process", action="store_true",
                   help="every process reads the weights (what --fsdp avoids)")
    args = p.parse_args(argv)
    from model import load_model, load_tokenizer
    from runtime.sharding import FsdpBackend
    backend = FsdpBackend("cpu", "fp32")
    tokenizer = load_tokenizer(args.pretrained_model_name)
    if args.every_process:
        model = load_model(args.pretrained_model_name, tokenizer)
        backend.weights = model.state_dict() if backend.is_master else None
        backend.model_class = type(model)
    else:
        model = backend.load_model(args.pretrained_model_name, tokenizer)
    backend.distribute(model)
    for rank, line in enumerate(backend.barrier("rss", f"{peak_rss_mib():.0f}")):
        if backend.is_master:
            print(f"process {rank}: peak RSS {line} MiB", flush=True)
    del model  # before its process group, which close() destroys
    backend.close()


if __name__ == "__main__":
    main()
