"""What this machine's hardware does well: whether bf16 pays, and how the CPU's allocator
should treat the memory a step frees. Facts about the machine, kept apart from the choice
of backend that uses them (runtime/backends.py)."""
import ctypes

import torch


def keep_freed_memory():
    """Have glibc keep the memory a CPU step frees for the next step. By default it gives
    every block over 128 KiB (activations, logits, their gradients) back to the system as
    soon as it is freed, and the next step takes it back, a page fault per 4 KiB page, each
    page zeroed: on two cores, a quarter to a third of the step. The process's peak is
    unchanged; it just holds on to it. Nothing to do where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    # Allocate from the heap, not a fresh mapping; glibc before 2.26 takes at most 32 MiB.
    if not libc.mallopt(m_mmap_threshold, 2**30):
        libc.mallopt(m_mmap_threshold, 2**25)
    libc.mallopt(m_trim_threshold, 2**30)  # and give the heap's top back only past 1 GiB


def fast_bf16(kind):
    """Whether the device multiplies bf16 matrices much faster than fp32 ones: a GPU that
    supports bf16 (tensor cores), or a CPU with AMX tiles (Intel Xeon from Sapphire Rapids
    on), where oneDNN runs a bf16 matrix product several times faster than an fp32 one
    (a KoGPT2-sized step 1.67x faster; see the README's performance section). Other CPUs
    keep fp32: for them autocast's casts would add work for little or no gain."""
    if kind == "cuda":  # not counting emulation (V100, T4), which is slower than fp32
        return torch.cuda.is_bf16_supported(including_emulation=False)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private; torch 2.9 has it
    return kind == "cpu" and amx is not None and amx() and torch.backends.mkldnn.is_available()
