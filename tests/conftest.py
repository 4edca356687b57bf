import os

os.environ.setdefault("XLA_FLAGS", "")  # tests that need several devices set it in a subprocess

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
