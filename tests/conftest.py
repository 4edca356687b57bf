import atexit
import os
import shutil
import tempfile

# Tests check results, not speed: XLA's backend optimisations double the CPU compile time of a small experiment
# and buy nothing here. Set before jax is imported (tests needing several devices start a subprocess).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
# Many tests build the same small experiment from fresh Python closures; a compilation cache keyed on the program
# text lets them (and the CLI subprocesses, which inherit the variables) compile it once per session.
# The process that makes the folder (pytest-xdist's controller, whose workers inherit it) removes it at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxdfl-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest

from jaxdfl.config import make_config


@pytest.fixture
def small_cfg():
    """A tiny, fast experiment: 8 nodes on a ring, logistic regression on digits."""

    def make(**overrides):
        base = {
            "rounds": 6, "eval_every": 2, "seed": 3,
            "topology": {"kind": "ring", "n": 8},
            "model": {"name": "logreg"},
            "train": {"lr": 0.2, "batch_size": 8, "local_steps": 2},
        }
        return make_config(base, overrides)

    return make
