"""Pallas kernels (installed as ``mechinterp.models.kernels``).

Fused router (:mod:`.router`), grouped matmul over experts (:mod:`.gmm`: ``ragged_dot``,
the megablox TPU kernel and a block-padded Pallas kernel) and gating kernels (:mod:`.gating`).

Each kernel has a plain ``jnp`` reference, a Pallas implementation and a dispatcher that picks
by backend (``impl=None``: Pallas on GPU/TPU, the reference on CPU; ``impl="pallas"`` on CPU
runs Pallas with ``interpret=True``, as the tests do). Differentiated kernels carry a
``custom_vjp`` whose backward pass is a Pallas kernel too.

None of the Pallas paths has been run on a GPU or TPU here; only interpret mode on CPU is
tested.
"""

from .gating import (
    swiglu,
    swiglu_pallas,
    swiglu_reference,
    threshold_gain,
    threshold_gain_pallas,
    threshold_gain_reference,
)
from .gmm import gmm, gmm_megablox, gmm_pallas, gmm_ragged, gmm_reference
from .router import (
    RoutingPlan,
    fused_router,
    fused_router_pallas,
    fused_router_reference,
)

__all__ = [
    "RoutingPlan",
    "fused_router",
    "fused_router_pallas",
    "fused_router_reference",
    "gmm",
    "gmm_megablox",
    "gmm_pallas",
    "gmm_ragged",
    "gmm_reference",
    "swiglu",
    "swiglu_pallas",
    "swiglu_reference",
    "threshold_gain",
    "threshold_gain_pallas",
    "threshold_gain_reference",
]
