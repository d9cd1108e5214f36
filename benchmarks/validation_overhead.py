"""What the input checks of :mod:`mechinterp.validate` cost on a patching sweep.

    python benchmarks/validation_overhead.py [--quick] [--repeats N]

Times ``mechinterp.patching.get_act_patch_resid_pre`` on the sweep benchmark's shapes
(``benchmarks/sweep_vs_transformerlens.py``: 4 layers, d_model 256, 8 heads, 2 kv heads,
d_mlp 768, vocabulary 32000, batch 8, sequence 32; logit difference at the last position)
with the checks on and with them bypassed (``validate.checks_disabled()``), interleaved,
after a warm-up that compiles both; prints the median of each and the relative overhead,
the process CPU time of each (less sensitive to other load on a shared machine), and
the time of the checks alone (``sweep.check_sweep_inputs``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import mechinterp as mi
from mechinterp import metrics, patching, validate
from mechinterp.models import Decoder, DecoderConfig
from mechinterp.sweep import check_sweep_inputs

FULL = dict(n_layers=4, d_model=256, n_heads=8, n_kv_heads=2, d_mlp=768, vocab=32000,
            batch=8, seq=32)
QUICK = dict(n_layers=2, d_model=128, n_heads=4, n_kv_heads=2, d_mlp=384, vocab=32000,
             batch=4, seq=16)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL
    config = DecoderConfig(vocab_size=cfg["vocab"], d_model=cfg["d_model"],
                           n_layers=cfg["n_layers"], n_heads=cfg["n_heads"],
                           n_kv_heads=cfg["n_kv_heads"], d_mlp=cfg["d_mlp"])
    model = Decoder(config)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg["vocab"], (cfg["batch"], cfg["seq"])).astype(np.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    params = jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape),
                                                jnp.float32), shapes)
    corrupted = rng.integers(0, cfg["vocab"], tokens.shape).astype(np.int32)
    _, cache = mi.capture(model, params, tokens, sites=["resid_pre"])
    metric = metrics.logit_diff(np.int32(1), np.int32(2))

    cpu_on, cpu_off = [], []

    def run():
        start, cpu = time.perf_counter(), time.process_time()
        result = patching.get_act_patch_resid_pre(model, params, corrupted, cache, metric,
                                                  progress=False)
        np.asarray(result)
        (cpu_on if validate.enabled() else cpu_off).append(time.process_time() - cpu)
        return time.perf_counter() - start

    run()
    with validate.checks_disabled():
        run()
    on, off = [], []
    for k in range(args.repeats):  # ABBA order: drifts in machine load cancel
        for checked in ((True, False) if k % 2 == 0 else (False, True)):
            if checked:
                on.append(run())
            else:
                with validate.checks_disabled():
                    off.append(run())
    cpu_on, cpu_off = cpu_on[1:], cpu_off[1:]  # drop the warm-up runs
    checks = []
    for _ in range(200):
        start = time.perf_counter()
        check_sweep_inputs(model, (corrupted,), {}, metric, None)
        checks.append(time.perf_counter() - start)
    t_on, t_off = statistics.median(on), statistics.median(off)
    t_check = statistics.median(checks)
    print(f"config: {cfg}; {jax.devices()[0].platform}, {args.repeats} repeats")
    print(f"sweep with checks:    {t_on * 1e3:9.2f} ms (median)")
    print(f"sweep checks bypassed: {t_off * 1e3:8.2f} ms (median)")
    print("with checks (s):", " ".join(f"{t:.3f}" for t in on))
    print("bypassed (s):   ", " ".join(f"{t:.3f}" for t in off))
    print(f"overhead: {100 * (t_on - t_off) / t_off:+.2f}% (timing noise included)")
    c_on, c_off = statistics.median(cpu_on), statistics.median(cpu_off)
    print(f"process CPU time (less sensitive to other load): {c_on:.3f} s with checks, "
          f"{c_off:.3f} s bypassed: {100 * (c_on - c_off) / c_off:+.2f}%")
    print(f"the checks alone: {t_check * 1e6:.1f} us = {100 * t_check / t_off:.3f}% of the sweep")


if __name__ == "__main__":
    main()
