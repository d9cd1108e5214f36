"""Cells per second of the patching grids on a SmolLM2-shaped decoder, on whatever device JAX has.

    python benchmarks/sweep_cells_per_second.py            # SmolLM2 shape, IOI-like pair
    python benchmarks/sweep_cells_per_second.py --quick    # 2 layers: a smoke run

For a GPU session (``benchmarks/gpu_session.sh``), where neither the SmolLM2 GGUF (93 MB)
nor torch fit the files a device run may carry: random weights of SmolLM2-135M's shape
(30 layers, d_model 576, 9 heads, 3 KV heads, d_mlp 1536, vocab 49152), a batch of 4 x 14
random tokens whose corrupted copy differs at position 9 (as the IOI pairs of
``sweep_vs_transformerlens.py``), metric: logit difference at the last position. Per grid:
default arguments and ``skip_unchanged=False``, first call and median of later calls,
cells per second, executed matmul FLOPs and GFLOP/s, next to a float32 matmul's peak
measured in the same run. TransformerLens's side of the comparison is the CPU run of
``sweep_vs_transformerlens.py`` (same shapes and cells).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import mechinterp as mi
from mechinterp import metrics, patching
from mechinterp.models import Decoder, DecoderConfig

GRIDS = ("resid_pre", "attn_head_out_all_pos", "attn_head_out_by_pos")


def matmul_peak(n=4096):
    """GFLOP/s of a float32 n^3 jnp matmul on the default device (best of 5)."""
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, a smoke run")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    # float32 as torch computes it by default (no TF32 on GPUs), as in the CPU comparison
    jax.config.update("jax_default_matmul_precision", "highest")
    config = DecoderConfig(vocab_size=49152, d_model=576, n_layers=2 if args.quick else 30,
                           n_heads=9, n_kv_heads=3, d_mlp=1536, tie_embeddings=True)
    model = Decoder(config)
    rng = np.random.default_rng(0)
    clean = jnp.asarray(rng.integers(0, config.vocab_size, (4, 14)), jnp.int32)
    corrupted = clean.at[:, 9].set((clean[:, 9] + 1) % config.vocab_size)
    params = model.init(jax.random.PRNGKey(0), clean)["params"]
    _, cache = mi.capture(model, params, clean, sites=["resid_pre", "attn.z"])
    metric = metrics.logit_diff(jnp.asarray(rng.integers(0, 100, 4)),
                                jnp.asarray(rng.integers(100, 200, 4)))
    peak = matmul_peak(1024 if args.quick else 4096)
    print(f"device {jax.devices()[0].device_kind}; float32 matmul peak {peak:,.0f} GFLOP/s; "
          f"{config.n_layers} layers, batch 4 x 14, corrupted differs at position 9")
    print(f"{'grid':<22} {'options':<22} {'cells':>5} {'skipped':>7} {'first s':>8} "
          f"{'median s':>8} {'cells/s':>9} {'GFLOP':>9} {'GFLOP/s':>8}")
    for grid in GRIDS:
        every = None
        for label, options in (("default", {}), ("skip_unchanged=False",
                                                 {"skip_unchanged": False})):
            def call(options=options):
                result = getattr(patching, f"get_act_patch_{grid}")(
                    model, params, corrupted, cache, metric, progress=False, **options)
                jax.block_until_ready(result.values)
                return result

            start = time.perf_counter()
            result = call()
            first = time.perf_counter() - start
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                again = call()
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            every = again.values if every is None else every
            np.testing.assert_allclose(again.values, every, atol=1e-4)  # both options agree
            cells = result.values.size
            print(f"{grid:<22} {label:<22} {cells:>5} {result.cost['skipped']:>7} "
                  f"{first:>8.2f} {median:>8.3f} {cells / median:>9.1f} "
                  f"{result.cost['flops'] / 1e9:>9.1f} "
                  f"{result.cost['flops'] / 1e9 / median:>8.1f}")


if __name__ == "__main__":
    main()
