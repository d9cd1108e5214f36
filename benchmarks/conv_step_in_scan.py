"""Why ``kit.seed_fit`` loops a compiled step in Python: CPU cost of one SegFormer training
step (TransKD's default teacher, batch 16, 32x32) three ways on XLA's CPU backend.

    python benchmarks/conv_step_in_scan.py

Prints CPU ms per step and seed for (a) a jitted step called from a Python loop, (b) the
same step inside ``lax.scan`` and (c) a ``vmap`` over 3 seeds of the jitted step (per-seed
conv kernels become grouped convolutions), with each ratio to (a).
"""

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mechinterp.cli import load_config
from mechinterp.experiments.transkd import seg_configs, student_loss
from mechinterp.models.segformer import SegFormer


def cpu_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    start = time.process_time()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.process_time() - start) / repeats * 1000


def main(steps: int = 10, seeds: int = 3):
    config = load_config(Path(__file__).parents[1] / "configs" / "transkd.py")
    model = SegFormer(seg_configs(config)["teacher"])
    rng = np.random.default_rng(0)
    batch = {"images": jnp.asarray(rng.random((16, 32, 32, 3), np.float32)),
             "masks": jnp.asarray(rng.integers(0, 7, (16, 32, 32)))}
    params = {"student": model.init(jax.random.key(0), batch["images"][:1])["params"]}
    loss, tx = student_loss(model, None, config.kd), optax.adam(1e-3)

    def step(carry, _):
        params, opt_state = carry
        grads = jax.grad(loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    carry = (params, tx.init(params))
    looped = cpu_ms(jax.jit(lambda c: step(c, None)[0]), carry, repeats=steps)
    scanned = cpu_ms(jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps)[0]),
                     carry, repeats=1) / steps
    stacked = jax.tree.map(lambda a: jnp.stack([a] * seeds), carry)
    vmapped = cpu_ms(jax.jit(jax.vmap(lambda c: step(c, None)[0])), stacked,
                     repeats=max(1, steps // seeds)) / seeds
    print(f"CPU ms per step and seed: python loop {looped:.0f}, lax.scan {scanned:.0f} "
          f"({scanned / looped:.1f}x), vmap over {seeds} seeds {vmapped:.0f} "
          f"({vmapped / looped:.1f}x)")


if __name__ == "__main__":
    main()
