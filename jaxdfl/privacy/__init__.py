"""Differential privacy: jitted mechanisms (one node, one step) and the host-side accountant.

Kernels (``mechanisms``) are pure jnp and are lifted over the node axis by the engine;
accounting (``accounting``) runs on the host with Google's dp-accounting, never under jit.
"""

from jaxdfl.privacy.accounting import buffer_size
from jaxdfl.privacy.accounting import calibrate_example_noise
from jaxdfl.privacy.accounting import calibrate_noise
from jaxdfl.privacy.accounting import calibrate_update_noise
from jaxdfl.privacy.accounting import epsilon
from jaxdfl.privacy.accounting import example_epsilon_max, example_epsilons
from jaxdfl.privacy.accounting import overflow_probability
from jaxdfl.privacy.accounting import update_epsilons
from jaxdfl.privacy.accounting import validate
from jaxdfl.privacy.mechanisms import clip_l1
from jaxdfl.privacy.mechanisms import clip_l2
from jaxdfl.privacy.mechanisms import dp_sum
from jaxdfl.privacy.mechanisms import poisson_batch
from jaxdfl.privacy.mechanisms import privatize_update

__all__ = [
    "buffer_size",
    "calibrate_example_noise",
    "calibrate_noise",
    "calibrate_update_noise",
    "clip_l1",
    "clip_l2",
    "dp_sum",
    "epsilon",
    "example_epsilon_max",
    "example_epsilons",
    "overflow_probability",
    "poisson_batch",
    "privatize_update",
    "update_epsilons",
    "validate",
]
