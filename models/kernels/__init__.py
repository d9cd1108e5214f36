"""Pallas kernels (installed as ``mechinterp.models.kernels``).

Fused router (:mod:`.router`), grouped matmul over experts (:mod:`.gmm`: ``ragged_dot``,
the megablox TPU kernel and a block-padded Pallas kernel) and gating kernels (:mod:`.gating`).

Each kernel has a plain ``jnp`` reference, a Pallas implementation and a dispatcher that picks
by backend (``impl=None``) from what was measured on an H200 (2026-11-27,
``benchmarks/moe_kernels.py``): the fused router's Pallas kernel on GPU (2.1-2.5x the
reference at 64k tokens x 64 experts), the grouped matmul's Pallas kernel on GPU (6.8x
``ragged_dot`` in bfloat16), but the XLA-fused reference for the elementwise gates (the Pallas gates
reached 0.5-0.9x of it at every block height tried). ``impl="pallas"`` on CPU runs Pallas
with ``interpret=True``, as the tests do. Differentiated kernels carry a ``custom_vjp`` whose
backward pass is a Pallas kernel too. On the H200 the kernel tests pass (45, and 5 skipped:
the TPU kernel and shapes that are not Triton blocks). The TPU paths have never run on a TPU.
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
