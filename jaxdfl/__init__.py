"""jaxdfl: decentralized federated learning simulator in JAX.

All nodes live on one stacked leading array axis; local training, DP noise, gossip, robust aggregation and attacks
are vmapped kernels, and a whole experiment is one compiled program.

    import jaxdfl
    cfg = jaxdfl.load_config("configs/quickstart.toml", ["topology.n=64"])
    result = jaxdfl.run(cfg)
    result.summary["final"]["accuracy_mean"]
"""

from jaxdfl import aggregators
from jaxdfl import attacks
from jaxdfl import data
from jaxdfl import models
from jaxdfl import privacy
from jaxdfl import rng
from jaxdfl import sweep
from jaxdfl import topology
from jaxdfl.config import Config
from jaxdfl.config import InertSettingWarning
from jaxdfl.config import inert_settings
from jaxdfl.config import load_config
from jaxdfl.config import make_config
from jaxdfl.errors import ConfigError
from jaxdfl.experiment import Experiment
from jaxdfl.experiment import Result
from jaxdfl.experiment import Runner
from jaxdfl.experiment import build
from jaxdfl.experiment import run

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "Experiment",
    "InertSettingWarning",
    "Result",
    "Runner",
    "aggregators",
    "attacks",
    "build",
    "data",
    "inert_settings",
    "load_config",
    "make_config",
    "models",
    "privacy",
    "rng",
    "run",
    "sweep",
    "topology",
]
