"""TEST-ONLY: Python imports this at start-up when this folder is on PYTHONPATH (see
tests/xla_cpu_replicas.py, whose `env(n)` puts it there)."""
import os
import sys

if os.environ.get("KOGPT2_TEST_XLA_REPLICAS") == "1":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import xla_cpu_replicas
    xla_cpu_replicas.install()
