"""Work per device and wall time of one activation-patching grid over 1, 2, 4, 8 devices.

    python benchmarks/sweep_scaling.py                  # CPU: 8 fake devices
    python benchmarks/sweep_scaling.py --layers 8 --seq 64 --d-model 256 --json rows.json

Each row runs ``get_act_patch_resid_pre`` with ``mesh=`` over the first N devices (cells
split N ways, reuse on) and reports: cells per device, XLA's FLOP count of one device's
program summed over its calls (``cost["device_flops"]``), the run and compile seconds, and
the largest difference from the one-device grid. Fake CPU devices share the host's cores:
they show the partition of work, not a speed-up; on GPUs or a TPU slice the run time is the
real scaling. Launching on a pod slice or a cluster: docs/sharded_sweeps.md.
"""

import argparse
import json
import os
import time

import jax

if jax.config.jax_platforms in (None, "", "cpu") and "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_num_cpu_devices", 8)  # before any backend starts; CPU only

import flax.linen as nn  # noqa: E402
import numpy as np  # noqa: E402

from mechinterp import metrics, patching  # noqa: E402
from mechinterp.models import Decoder, DecoderConfig  # noqa: E402
from mechinterp.sharding import make_mesh  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()

    heads = max(1, args.d_model // 16)
    model = Decoder(DecoderConfig(vocab_size=256, d_model=args.d_model, n_layers=args.layers,
                                  n_heads=heads, n_kv_heads=heads, d_mlp=4 * args.d_model))
    rng = np.random.default_rng(0)
    corrupt = rng.integers(0, 256, (args.batch, args.seq)).astype(np.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), corrupt)["params"])
    cache = {"resid_pre": rng.standard_normal(
        (args.layers, args.batch, args.seq, args.d_model)).astype(np.float32)}
    metric = metrics.logit_diff(np.arange(args.batch) % 256, (np.arange(args.batch) + 1) % 256)

    rows, reference = [], None
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}; grid (layer, pos) = "
          f"{args.layers} x {args.seq} cells, batch {args.batch}, d_model {args.d_model}")
    print("| devices | cells/device | GFLOP/device | run s | compile s | wall s | max diff |")
    print("|---|---|---|---|---|---|---|")
    for n in map(int, args.devices.split(",")):
        if n > jax.device_count():
            print(f"(skipping {n} devices: only {jax.device_count()})")
            continue
        mesh = make_mesh({"data": n}, devices=jax.devices()[:n])
        start = time.perf_counter()
        grid = patching.get_act_patch_resid_pre(model, params, corrupt, cache, metric,
                                                progress=False, mesh=mesh)
        wall = time.perf_counter() - start
        values = np.asarray(grid)
        reference = values if reference is None else reference
        cost = grid.cost
        row = dict(devices=n, cells_per_device=-(-values.size // n),
                   device_gflop=cost["device_flops"] / 1e9, run_s=cost["run_s"],
                   compile_s=cost["compile_s"], wall_s=wall,
                   max_diff=float(np.abs(values - reference).max()))
        rows.append(row)
        print("| {devices} | {cells_per_device} | {device_gflop:.3f} | {run_s:.2f} | "
              "{compile_s:.2f} | {wall_s:.2f} | {max_diff:.1e} |".format(**row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
