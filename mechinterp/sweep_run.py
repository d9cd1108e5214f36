"""Running a cell function over many items: ``jit(vmap(fn))`` in equal chunks.

Executables are compiled ahead of time and cached per function and argument shapes, so a
sweep knows what it spent compiling (``compile_s``) and what each executable holds (XLA's
``memory_analysis``: arguments, outputs and temporaries), and can shrink its chunks to a
byte budget counted on the real executable. A chunk may carry an unbatched first argument
(a resumed sweep's start layer), shared by its items.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mechinterp import validate
from mechinterp.jaxpr_flops import jaxpr_matmul_flops

_VMAPPED: "weakref.WeakKeyDictionary[Callable, dict]" = weakref.WeakKeyDictionary()
# What tracing or compiling a function gives (output shapes, executables and FLOPs), kept per
# function and argument shapes for as long as the function lives: a repeated sweep traces
# and compiles nothing.
_EXECUTABLES: "weakref.WeakKeyDictionary[Callable, dict]" = weakref.WeakKeyDictionary()
OUTPUT_SHAPES: "weakref.WeakKeyDictionary[Callable, dict]" = weakref.WeakKeyDictionary()


def jit_vmap(fn, n_unbatched: int, out_shardings=None):
    """``jit(vmap(fn))`` over the first argument, cached for as long as ``fn`` lives;
    ``out_shardings``: where the values go (a sharded sweep gathers them replicated)."""
    per_fn = _VMAPPED.setdefault(fn, {})
    if (n_unbatched, out_shardings) not in per_fn:
        per_fn[n_unbatched, out_shardings] = jax.jit(
            jax.vmap(fn, in_axes=(0,) + (None,) * n_unbatched), out_shardings=out_shardings)
    return per_fn[n_unbatched, out_shardings]


def shape_key(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(x), str(jnp.result_type(x)),
                           bool(getattr(x, "weak_type", False))) for x in leaves)


def _sharding_key(tree):
    """The layout of every sharded leaf (one-device and host leaves: ``None``)."""
    return tuple(x.sharding if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1
                 else None for x in jax.tree.leaves(tree))


def once_per_shapes(store, trace, fn, args):
    """``trace(fn, *args)``, computed once per ``fn`` and shapes (and shardings) of
    ``args``."""
    per_fn = store.setdefault(fn, {})
    key = shape_key(args), _sharding_key(args)
    if key not in per_fn:
        per_fn[key] = trace(fn, *args)
    return per_fn[key]


class _Compiled(NamedTuple):
    executable: Any
    seconds: float | None  # None once counted
    temp: int
    held: int
    flops: tuple[int, int]  # matmul FLOPs with every cond's costliest / cheapest branch
    device_flops: float  # XLA's count for one device's program (the partitioned one)


def compile_counted(run, *args):
    """Trace, count matmul FLOPs (every cond's costliest and cheapest branch), compile and
    measure: one trace serves the count and the compilation."""
    start = time.perf_counter()
    traced = run.trace(*args)
    flops = (jaxpr_matmul_flops(traced.jaxpr), jaxpr_matmul_flops(traced.jaxpr, "min"))
    executable = traced.lower().compile()
    memory = executable.memory_analysis()
    held = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    device_flops = float((executable.cost_analysis() or {}).get("flops", 0.0))
    return _Compiled(executable, time.perf_counter() - start, memory.temp_size_in_bytes,
                     held, flops, device_flops)


def balanced(n: int, chunk_size: int) -> int:
    """As many chunks as ``chunk_size`` gives, but equal: padding < 1 item per chunk."""
    return -(-n // -(-n // int(chunk_size)))


class Runner:
    """Runs cell functions in chunks and adds up what it cost: ``compiles`` and
    ``compile_s`` (first compilations only), ``calls`` and ``run_s``, ``peak_bytes`` (the
    largest executable's arguments, outputs and temporaries, per device) and matmul
    ``flops`` (all devices), ``device_flops`` (XLA's count of one device's share).
    ``placement`` (:class:`mechinterp.sweep_mesh.Placement`): chunks split over its mesh."""

    def __init__(self, bar, placement=None):
        self.bar, self.compile_s, self.run_s, self.peak_bytes, self.flops = bar, 0.0, 0.0, 0, 0
        self.calls = self.compiles = 0
        self.device_flops, self.placement = 0.0, placement

    def executable(self, run, args, budget=None):
        """The compiled ``run`` for ``args``; ``budget``: fail (``None``) when its
        temporaries exceed that many bytes."""
        compiled = once_per_shapes(_EXECUTABLES, compile_counted, run, args)
        if budget is not None and compiled.temp > budget:
            return None, compiled.temp
        if compiled.seconds is not None:
            self.compile_s += compiled.seconds
            self.compiles += 1
            _EXECUTABLES[run][shape_key(args), _sharding_key(args)] = compiled._replace(
                seconds=None)
        self.peak_bytes = max(self.peak_bytes, compiled.held)
        return compiled, compiled.temp

    def run_once(self, fn, args):
        """``fn(*args)`` (a jitted function) through a cached executable, counted like a
        chunk (compilation, run time, matmul FLOPs, bytes held) but not as one."""
        compiled, _ = self.executable(fn, args)
        start = time.perf_counter()
        out = jax.block_until_ready(compiled.executable(*args))
        self.run_s += time.perf_counter() - start
        self.flops += compiled.flops[0]  # device_flops stays the cells' share
        return out

    def chunks(self, fn, items, shared, chunk_size, *, first_of=None, budget=None,
               layer_flops=None, count_flops=True):
        """``fn`` over ``items`` (a pytree, leading axis) in equal padded chunks.

        ``first_of(chunk)``: an unbatched first argument per chunk. ``budget``: the chunk
        shrinks until the executable's temporaries fit (``chunk_size`` is a first guess).
        ``layer_flops(first)``: the fraction of the cond-skippable FLOPs a chunk runs.
        Returns the values (numpy)."""
        n = len(jax.tree.leaves(items)[0])
        place = self.placement
        ways = 1 if place is None else place.ways
        cells = (lambda chunk: chunk) if place is None else place.cells
        firsts = () if first_of is None else (self._scalar(0),)
        run = jit_vmap(fn, len(firsts) + len(shared),
                       None if place is None else place.replicated)
        while True:
            size = -(-balanced(n, chunk_size) // ways) * ways  # each device: equal shares
            probe = (cells(jax.tree.map(lambda leaf: np.repeat(leaf[:1], size, 0), items)),
                     *firsts, *shared)
            compiled, temp = self.executable(run, probe, None if size == ways else budget)
            if compiled is not None:
                break
            chunk_size = max(1, min(size - ways, size * budget // temp))
        outputs = []  # device arrays: no host sync between chunks
        start = time.perf_counter()
        for begin in range(0, n, size):
            chunk = jax.tree.map(lambda leaf, b=begin: _padded(leaf[b:b + size], size), items)
            first = () if first_of is None else (int(first_of(chunk)),)
            outputs.append(compiled.executable(cells(chunk), *map(self._scalar, first),
                                               *shared))
            self.calls += 1
            self.device_flops += compiled.device_flops
            if count_flops:
                most, least = compiled.flops
                self.flops += most if not first else least + round(
                    (most - least) * layer_flops(first[0]))
            self.bar.update(1)
        values = np.concatenate([np.asarray(out) for out in outputs])[:n]
        self.run_s += time.perf_counter() - start
        return values

    def _scalar(self, value):
        value = np.int32(value)
        return value if self.placement is None else self.placement.put(
            value, self.placement.replicated, "the start layer")


def _padded(chunk, size):
    return np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), 0)])


def map_in_chunks(fn, items, shared, chunk_size: int, *, desc: str, progress: bool = True,
                  placement=None):
    """``np.stack([fn(item, *shared) for item in items])``, as ``jit(vmap(fn))`` over chunks.

    ``items`` is a pytree whose leaves share a leading axis; ``shared`` is passed unbatched
    (``in_axes=None``), so large operands are not copied per item. The last chunk is padded
    by repeating its final item, so every chunk has one shape and compiles once (per
    ``fn``: pass the same function object to reuse the compilation across calls).
    ``placement`` (:mod:`mechinterp.sweep_mesh`): items split over its mesh, ``shared``
    already placed.
    """
    validate.check_positive_int(chunk_size, "chunk_size")
    n = len(jax.tree.leaves(items)[0])
    if n == 0:
        raise ValueError(f"{desc}: nothing to run (no items)")
    n_chunks = -(-n // balanced(n, chunk_size))
    with tqdm(total=n_chunks, desc=desc, disable=not progress, leave=False) as bar:
        return Runner(bar, placement).chunks(fn, items, tuple(shared), chunk_size,
                                             count_flops=False)
