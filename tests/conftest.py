import atexit
import os
import shutil
import subprocess
import sys
import tempfile

# Tests check results, not speed: XLA's backend optimisations double the CPU compile time of a small experiment
# and buy nothing here; XLA:CPU's older loop emitters compile a small experiment in half the time of its fusion
# emitters (same results). Compilation is most of the suite's time. Set before jax is imported (tests needing several
# devices start a subprocess, and pytest-xdist's workers, which inherit the variables). A jaxlib that does not know
# the emitter flag would abort on it, so it is tried once in a subprocess first.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
_LEGACY_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    flags = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
                           env=dict(os.environ, XLA_FLAGS=f"{flags} {_LEGACY_EMITTERS}", JAX_PLATFORMS="cpu"),
                           capture_output=True)
    os.environ["XLA_FLAGS"] = f"{flags} {_LEGACY_EMITTERS}" if probe.returncode == 0 else flags
# Many tests build the same small experiment from fresh Python closures; a compilation cache keyed on the program
# text lets them (and the CLI subprocesses, which inherit the variables) compile it once per session.
# The process that makes the folder (pytest-xdist's controller, whose workers inherit it) removes it at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxdfl-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402 (the variables above must be set before jax is imported)

from jaxdfl.config import make_config  # noqa: E402


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


@pytest.fixture
def as_shipped():
    """Compiler options that undo the tests' emitter flag, for tests of XLA's memory use (the older emitters
    keep other temporaries)."""
    return {"xla_cpu_use_fusion_emitters": True} if _LEGACY_EMITTERS in os.environ["XLA_FLAGS"] else {}
