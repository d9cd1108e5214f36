"""Counting the matrix-multiply FLOPs a JAX function executes, from its jaxpr.

``matmul_flops(fn, *args)`` traces ``fn`` (no compute) and adds up ``2 * M * N * K`` (one
multiply and one add per multiply-accumulate) over every ``dot_general``, including those
inside ``jit``, ``vmap``-ed, ``scan``-ned (times the scan length), ``remat``-ed and custom-
derivative sub-computations. Elementwise work (norms, softmax, RoPE) is left out: in a
transformer it is well under a few percent of the total. Unlike XLA's ``cost_analysis``,
which counts the body of a loop once, a ``scan`` over ``n`` layers counts ``n`` times.
A ``while`` loop with an unknown trip count is counted once per body; ``cond`` counts its
most expensive branch (``cond="min"``: its cheapest, e.g. every skippable layer skipped).
"""

from __future__ import annotations

import math

import jax
from jax.extend import core as jex_core


def _dot_general_flops(eqn) -> int:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
    contract = math.prod(lhs[d] for d in lhs_contract)
    batch = math.prod(lhs[d] for d in lhs_batch)
    lhs_free = math.prod(n for d, n in enumerate(lhs) if d not in (*lhs_contract, *lhs_batch))
    rhs_free = math.prod(n for d, n in enumerate(rhs) if d not in (*rhs_contract, *rhs_batch))
    return 2 * batch * lhs_free * rhs_free * contract


def _sub_jaxprs(value):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def jaxpr_matmul_flops(jaxpr, cond: str = "max") -> int:
    """Matmul FLOPs of a (closed) jaxpr; see the module docstring for what is counted."""
    if cond not in ("max", "min"):
        raise ValueError(f"cond must be 'max' or 'min', got {cond!r}")
    if isinstance(jaxpr, jex_core.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_general_flops(eqn)
            continue
        if name == "cond":
            pick = max if cond == "max" else min
            total += pick(jaxpr_matmul_flops(b, cond) for b in eqn.params["branches"])
            continue
        inner = sum(jaxpr_matmul_flops(sub, cond) for value in eqn.params.values()
                    for sub in _sub_jaxprs(value))
        total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def matmul_flops(fn, *args, cond: str = "max", **kwargs) -> int:
    """Matmul FLOPs of ``fn(*args, **kwargs)`` (traced abstractly; nothing runs); ``cond``
    picks each ``cond``'s most (``"max"``) or least (``"min"``) expensive branch."""
    return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args, **kwargs), cond)
