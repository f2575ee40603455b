"""On the CPU the backend keeps the memory a step frees for the next step: with glibc as it
comes, every block over 128 KiB goes back to the system when freed and is page-faulted in
again, page by page, at the next step."""
import ctypes
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow  # every test here runs train.py or generate.py as a process

STEPS = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
from runtime import backends
if sys.argv[2] == "cpu backend":
    backends.Backend("cpu", None)

def page_faults_of_a_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    activations = torch.ones(16 * 2**20)  # 64 MiB, written, then freed
    del activations
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

page_faults_of_a_step()  # the first step takes its memory from the system either way
# The fewest of five steps: a kernel that reclaims idle memory (as DAMON reclaim does)
# may take kept pages back now and then, between steps far apart.
print(min(page_faults_of_a_step() for _ in range(5)))
"""


def glibc():
    try:
        ctypes.CDLL("libc.so.6")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not glibc(), reason="keep_freed_memory tunes glibc's allocator only")
def test_the_cpu_backend_keeps_freed_memory_for_the_next_step():
    faults = {}
    for setting in ("glibc as it comes", "cpu backend"):
        result = subprocess.run([sys.executable, "-c", STEPS, str(ROOT), setting],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        faults[setting] = int(result.stdout.split()[-1])
    # As it comes: each page of the 64 MiB again (16,384 pages of 4 KiB; 32 if the system
    # backs them with 2 MiB pages). Kept: next to none.
    assert faults["glibc as it comes"] >= 32
    assert faults["cpu backend"] * 10 < faults["glibc as it comes"]
