"""TEST-ONLY support: run the real multi-replica XLA path (`xmp.spawn`, all-reduce,
barriers) with several replicas on a CPU-only machine. Never imported by the project.

`PJRT_DEVICE=CPU CPU_NUM_DEVICES=N` gives torch_xla 2.9 N CPU devices, and `xmp.spawn`
runs one replica THREAD per device, all in one process. Collectives then hang for
reasons that are particular to XLA:CPU (pytorch/xla's own CI never runs them with more
than one CPU device); `env(n)` below and `install()` deal with each:

1. An all-reduce on XLA:CPU meets its peers under a key taken from the compiled
   module's unique id. Two replica threads that miss the shared graph cache at the same
   moment compile two modules with two ids and wait for each other forever. So every
   graph compile (the step marker, and a host read of a pending tensor, which compiles
   its own graph) is serialised behind one process-wide lock; a thread waits for its
   device's earlier executions *outside* the lock, since those may sit in a collective
   that needs another thread's next compile.
2. `xm.rendezvous` all-gathers a tensor padded by the replica's ordinal, so every
   replica builds a different graph and rule 1 cannot help: it is replaced by a
   `threading.Barrier` between the replica threads, which is what it means there.
3. XLA's execution pool has as many threads as cores by default; N replicas blocked in
   one collective need N of them at once: `XLA_THREAD_POOL_SIZE`.
4. The asynchronous CPU client frees buffers in the thread that drops them, and blocks
   when a running collective still uses one: `PJRT_CPU_ASYNC_CLIENT=false`.
5. Reads to the host (`.item()`, `.cpu()`, ...) run one at a time too, behind the same
   lock, after the thread's own executions are done (so a read never waits on a peer).
   Without that, one CI run of the 8-replica test died of SIGSEGV inside `.item()` while a
   second replica thread was inside `.item()` as well (the first all-reduce,
   `check_output_shared`); XLA:CPU's multi-device paths are not something pytorch/xla runs.

A TPU needs none of this. The process loads this module at start-up through
`tests/xla_cpu_site/sitecustomize.py` (on PYTHONPATH) when KOGPT2_TEST_XLA_REPLICAS=1, so
the replica process that `xmp.spawn` starts gets it too, before train.py is imported.
"""
import functools
import os
import threading
from pathlib import Path

SITE = Path(__file__).resolve().parent / "xla_cpu_site"


def env(n):
    """Environment for a `train.py --device xla` process with `n` CPU replicas."""
    return {"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(n),
            "XLA_THREAD_POOL_SIZE": str(4 * max(n, 2)),
            "PJRT_CPU_ASYNC_CLIENT": "false",
            "KOGPT2_TEST_XLA_REPLICAS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(SITE),
                                                        os.environ.get("PYTHONPATH")]))}


_compile_lock = threading.Lock()


def _serialised_step_marker(step_marker, xlac):
    @functools.wraps(step_marker)
    def step_marker_one_at_a_time(device, devices, wait=False, reset_scope=True):
        own = devices or xlac._xla_real_devices([device])
        xlac._xla_wait_device_ops(devices=own)       # earlier work may be in a collective
        with _compile_lock:
            step_marker(device, devices, wait=False, reset_scope=reset_scope)
        # Wait with the GIL released: torch_xla drops old buffers right after this call,
        # holding the GIL, and dropping one that a collective still reads would block the
        # very threads the collective waits for.
        xlac._xla_wait_device_ops(devices=own)
    return step_marker_one_at_a_time


def _reads_after_a_sync(read, sync):
    @functools.wraps(read)
    def read_synced(self, *args, **kwargs):
        if self.device.type != "xla":
            return read(self, *args, **kwargs)
        sync()  # the pending graph compiles under the lock; the read then compiles nothing
        with _compile_lock:
            return read(self, *args, **kwargs)
    return read_synced


_barriers = {}
_barriers_lock = threading.Lock()


def _thread_rendezvous(tag, payload=b"", replicas=()):
    import torch_xla
    import torch_xla.runtime as xr
    torch_xla.sync()
    world = xr.world_size()
    if world == 1:
        return [payload]
    with _barriers_lock:
        shared = _barriers.setdefault(world, {"barrier": threading.Barrier(world, timeout=300),
                                              "payloads": [None] * world})
    shared["payloads"][xr.global_ordinal()] = payload
    shared["barrier"].wait()
    payloads = list(shared["payloads"])
    shared["barrier"].wait()  # nobody writes the next round's payload before all have read
    return payloads


def install():
    import torch
    import torch_xla
    import torch_xla.core.xla_model as xm
    xlac = torch_xla._XLAC
    if getattr(xlac, "_kogpt2_test_replicas", False):
        return
    xlac._xla_step_marker = _serialised_step_marker(xlac._xla_step_marker, xlac)

    def sync():
        xlac._xla_step_marker(xlac._xla_get_default_device(), [])
    for name in ("item", "tolist", "cpu", "numpy"):
        setattr(torch.Tensor, name, _reads_after_a_sync(getattr(torch.Tensor, name), sync))
    xm.rendezvous = _thread_rendezvous
    xlac._kogpt2_test_replicas = True
