import os

# Tests check results, not speed: XLA's backend optimisations double the CPU compile time of a small experiment
# and buy nothing here. Set before jax is imported (tests needing several devices start a subprocess).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

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
