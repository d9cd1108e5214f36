"""Activation-patching grids: mechinterp's vectorized sweeps against TransformerLens.

    python benchmarks/sweep_vs_transformerlens.py            # the issue's configuration
    python benchmarks/sweep_vs_transformerlens.py --quick    # a small one, for a smoke run
    python benchmarks/sweep_vs_transformerlens.py --chunk-size 8 --chunk-size 32

The same weights in both: a LLaMA-style Hugging Face model (4 layers, d_model 256, 8 heads,
2 KV heads, d_mlp 768, vocab 32000) with random weights, saved to a temporary folder, loaded
by ``mechinterp.models.load_hf`` and by TransformerLens 4.x's
``TransformerBridge.boot_transformers`` (eval mode, float32, raw weights, under
``torch.inference_mode``). Batch 8, sequence 32, metric: logit difference at the last
position, mean over the batch. Grids: ``resid_pre`` (layer x pos) and
``attn_head_out_by_pos`` (layer x pos x head).

What is measured, per side and grid:

- forwards: TransformerLens runs one full forward per grid cell
  (``generic_activation_patch``). Ours evaluates the same cells as a few jitted ``vmap``
  calls: without reuse (``reuse=False``) one full forward per cell with logits only at the
  answer position; with reuse (``reuse=True``, issue 3 item 5) cells are grouped by layer
  and block of positions (``--position-blocks``) and each group resumes from the cached
  corrupted residual stream at its layer, for its positions only, reading earlier
  positions' keys and values from the cache.
- FLOPs: matmul FLOPs (2 per multiply-add). TransformerLens: analytic FLOPs of one forward
  times the forwards, cross-checked with ``torch.utils.flop_counter.FlopCounterMode`` on
  one hooked forward. Ours: what the sweep executed, counted from the jaxprs it ran
  (``SweepResult.cost["flops"]``, scans counted per layer, chunk padding included), next to
  ``cost["naive_flops"]`` (one full forward with full logits per cell).
- time: median wall time over ``--runs`` runs (>= 3). Ours: the first public call (trace +
  compile + run, compile time from JAX's own monitoring events) and the median of later
  calls, which reuse the compilation (the ratio uses these).
- TransformerLens runs with the torch thread count (1 or all cores) that is fastest for one
  hooked forward on this machine, measured first: on a shared CPU, intra-op threads can
  make small torch ops many times slower.
- max |ours - TL| over each grid (must be <= 1e-4) and the grid's value range.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens draws a progress bar per grid

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tok_models

import mechinterp
from mechinterp import patching
from mechinterp.metrics import logit_diff
from mechinterp.models import load_hf
from mechinterp.sweep import DEFAULT_POSITION_BLOCKS

TOL = 1e-4
FULL = dict(n_layers=4, d_model=256, n_heads=8, n_kv_heads=2, d_mlp=768, vocab=32000,
            batch=8, seq=32)
QUICK = dict(n_layers=2, d_model=128, n_heads=4, n_kv_heads=2, d_mlp=384, vocab=32000,
             batch=4, seq=16)
GRIDS = {  # grid name -> (our site, TransformerLens hook of layer 0)
    "resid_pre": ("resid_pre", "blocks.0.hook_resid_pre"),
    "attn_head_out_by_pos": ("attn.z", "blocks.0.attn.hook_z"),
}
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


# ------------------------------------------------------------------------------ setup


def build_folder(cfg, folder, seed=0):
    """A random LLaMA-style HF model plus a word-level tokenizer, saved to ``folder``."""
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["d_model"], intermediate_size=cfg["d_mlp"],
        num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
        num_key_value_heads=cfg["n_kv_heads"], max_position_embeddings=max(128, cfg["seq"]),
        tie_word_embeddings=False, rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    with torch.no_grad():  # larger than HF's init so the grids are far from flat
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    # TransformerLens's boot needs a tokenizer in the folder; build one offline.
    backend = Tokenizer(tok_models.WordLevel({f"t{i}": i for i in range(cfg["vocab"])}, "t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0") \
        .save_pretrained(folder)


def forward_flops(cfg, logit_positions):
    """Analytic matmul FLOPs of one forward on (batch, seq) tokens (2 per multiply-add).

    Per layer: q/k/v/o projections, scores and pattern @ v over the full seq x seq (as an
    eager implementation computes them), the three SwiGLU matrices; then the unembedding
    at ``logit_positions`` positions per example. Norms, RoPE, softmax and the other
    elementwise work are left out (well under 1%).
    """
    b, s, d, dh = cfg["batch"], cfg["seq"], cfg["d_model"], cfg["d_model"] // cfg["n_heads"]
    h, kv = cfg["n_heads"], cfg["n_kv_heads"]
    projections = d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * cfg["d_mlp"]
    per_layer = 2 * b * s * projections + 2 * 2 * b * h * s * s * dh
    return cfg["n_layers"] * per_layer + 2 * b * logit_positions * d * cfg["vocab"]


def pick_torch_threads(bridge, tokens, hook_name):
    """The torch thread count (1 or all) with the fastest hooked forward here."""
    def hook(act, hook):
        return act

    best = None
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            bridge.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook)])
            times = []
            for _ in range(3):
                start = time.perf_counter()
                bridge.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook)])
                times.append(time.perf_counter() - start)
        ms = 1e3 * statistics.median(times)
        print(f"  torch {threads} thread(s): {ms:.1f} ms per hooked forward")
        if best is None or ms < best[1]:
            best = (threads, ms)
    torch.set_num_threads(best[0])
    return best


# ------------------------------------------------------------------------------ timing


class CompileClock:
    """Sums the durations JAX reports for tracing, lowering and compiling."""

    def __init__(self):
        self.seconds = 0.0
        self.backend_compiles = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if event in COMPILE_EVENTS:
            self.seconds += duration
            self.backend_compiles += event == COMPILE_EVENTS[-1]

    def reset(self):
        self.seconds, self.backend_compiles = 0.0, 0


def median_time(fn, runs):
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


# ------------------------------------------------------------------------------ main


def fmt_flops(x):
    return "n/a" if x is None else f"{x / 1e9:,.0f} G" if x >= 1e11 else f"{x / 1e9:.1f} G"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"small configuration {QUICK}")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side (>= 3)")
    parser.add_argument("--position-blocks", type=int, action="append", default=None,
                        help="time reuse with this many position blocks (repeatable; "
                             f"default {DEFAULT_POSITION_BLOCKS})")
    parser.add_argument("--grids", default=",".join(GRIDS),
                        help="comma-separated subset of " + ", ".join(GRIDS))
    args = parser.parse_args(argv)
    if args.runs < 3:
        parser.error("--runs must be >= 3")
    grids = [g for g in args.grids.split(",") if g]
    for grid in grids:
        if grid not in GRIDS:
            parser.error(f"unknown grid {grid!r}; choose from {list(GRIDS)}")
    cfg = QUICK if args.quick else FULL
    from importlib.metadata import version

    from torch.utils.flop_counter import FlopCounterMode
    from transformer_lens import patching as tl_patching
    from transformer_lens.model_bridge import TransformerBridge

    print(f"config: {cfg}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
          f"cores, load average {os.getloadavg()[0]:.1f}; jax {jax.__version__} "
          f"({jax.devices()[0].platform}), torch {torch.__version__}, "
          f"transformer_lens {version('transformer-lens')}")

    with tempfile.TemporaryDirectory() as folder:
        build_folder(cfg, folder)
        bridge = TransformerBridge.boot_transformers(folder, dtype=torch.float32, device="cpu")
        bridge.eval()
        model, params = load_hf(folder)

    rng = np.random.default_rng(0)
    b, s, vocab = cfg["batch"], cfg["seq"], cfg["vocab"]
    clean = rng.integers(0, vocab, (b, s))
    corrupted = clean.copy()
    changed = [s // 4, s // 2]
    corrupted[:, changed] = rng.integers(0, vocab, (b, len(changed)))
    correct, incorrect = rng.integers(0, vocab, b), rng.integers(0, vocab, b)
    correct_t, incorrect_t = torch.tensor(correct), torch.tensor(incorrect)

    def tl_metric(logits):
        last = logits[:, -1]
        return (last.gather(-1, correct_t[:, None])
                - last.gather(-1, incorrect_t[:, None])).mean()

    metric = logit_diff(jnp.asarray(correct), jnp.asarray(incorrect))
    clean_j, corrupted_j = jnp.asarray(clean), jnp.asarray(corrupted)
    clean_t, corrupted_t = torch.tensor(clean), torch.tensor(corrupted)

    print("TransformerLens threads:")
    threads, _ = pick_torch_threads(bridge, corrupted_t, GRIDS[grids[0]][1])
    with torch.inference_mode():
        _, tl_cache = bridge.run_with_cache(clean_t)
        with FlopCounterMode(display=False) as counter:
            bridge.run_with_hooks(corrupted_t, fwd_hooks=[])
    tl_forward_measured = counter.get_total_flops()
    tl_forward = forward_flops(cfg, logit_positions=s)
    sites = [site for site, _ in (GRIDS[g] for g in grids)]
    _, cache = mechinterp.capture(model, params, clean_j, sites=sites)
    clock = CompileClock()
    variants = [("ours, no reuse", dict(reuse=False))] + [
        (f"ours, reuse, {blocks} position blocks", dict(reuse=True, position_blocks=blocks))
        for blocks in (args.position_blocks or [DEFAULT_POSITION_BLOCKS])]

    rows, failures = [], []
    for grid in grids:
        name = f"get_act_patch_{grid}"
        print(f"\n== {grid} ==")

        # TransformerLens: one forward per cell.
        def tl_call(name=name):
            with torch.inference_mode():
                return getattr(tl_patching, name)(bridge, corrupted_t, tl_cache, tl_metric)

        tl_s, tl_grid = median_time(tl_call, args.runs)
        tl_grid = tl_grid.numpy()
        cells = tl_grid.size
        print(f"  TransformerLens: {cells} forwards, median {tl_s:.2f} s")
        rows.append(dict(side="TransformerLens", grid=grid, cells=cells, groups=None,
                         flops=cells * tl_forward, median=tl_s, first=None, compile=None,
                         ratio=None, diff=None, rng=float(np.ptp(tl_grid))))

        for label, options in variants:
            def our_call(name=name, options=options):
                return getattr(patching, name)(model, params, corrupted_j, cache, metric,
                                               progress=False, **options)

            clock.reset()
            start = time.perf_counter()
            result = our_call()
            first_s, first_compile = time.perf_counter() - start, clock.seconds
            clock.reset()
            later_s, again = median_time(our_call, args.runs)
            assert np.array_equal(result.values, again.values)
            diff = float(np.max(np.abs(result.values - tl_grid)))
            if result.shape != tl_grid.shape or not diff <= TOL:
                failures.append(f"{grid}, {label}: max |ours - TL| = {diff:.2e}")
            print(f"  {label}: first call {first_s:.2f} s (compile {first_compile:.2f} s), "
                  f"later median {later_s:.2f} s ({clock.backend_compiles} compiles in later "
                  f"calls), {result.cost['groups']} groups")
            rows.append(dict(side=label, grid=grid, cells=cells, groups=result.cost["groups"],
                             flops=result.cost["flops"], naive=result.cost["naive_flops"],
                             median=later_s, first=first_s, compile=first_compile,
                             ratio=tl_s / later_s, diff=diff, rng=None))

    # ---------------------------------------------------------------- table
    print(f"\nFLOPs: TransformerLens = analytic matmul FLOPs of one forward x forwards "
          f"({tl_forward / 1e9:.3f} GFLOP analytic, {tl_forward_measured / 1e9:.3f} GFLOP by "
          "torch FlopCounterMode per forward); ours = matmul FLOPs the sweep executed, counted "
          "from its jaxprs (SweepResult.cost). TransformerLens ran with torch threads = "
          f"{threads}, under torch.inference_mode. 'first s' = our first public call (trace + "
          "compile + run); 'median s' = later calls, which reuse the compilation.\n")
    header = (f"{'grid':<21} {'side':<34} {'cells':>6} {'groups':>6} {'FLOPs':>9} "
              f"{'TL/ours FLOPs':>13} {'GFLOP/s':>7} {'first s':>7} {'compile s':>9} "
              f"{'median s':>8} {'TL/ours':>7} {'max|diff|':>9}")
    print(header)
    print("-" * len(header))
    tl_rows = {r["grid"]: r for r in rows if r["side"] == "TransformerLens"}
    for r in rows:
        tl = r["side"] == "TransformerLens"
        flop_ratio = "" if tl else f"{tl_rows[r['grid']]['flops'] / r['flops']:.1f}x"
        print(f"{r['grid']:<21} {r['side']:<34} {r['cells']:>6} "
              f"{'-' if tl else r['groups']:>6} {fmt_flops(r['flops']):>9} {flop_ratio:>13} "
              f"{r['flops'] / r['median'] / 1e9:>7.1f} "
              f"{'-' if tl else format(r['first'], '.2f'):>7} "
              f"{'-' if tl else format(r['compile'], '.2f'):>9} {r['median']:>8.2f} "
              f"{'' if tl else format(r['ratio'], '.1f') + 'x':>7} "
              f"{'' if tl else format(r['diff'], '.1e'):>9}")
    for r in rows:
        if r["rng"] is not None:
            print(f"{r['grid']}: TransformerLens grid values span {r['rng']:.3f} "
                  f"(so a 1e-4 agreement is meaningful)")
    if failures:
        print("\nFAILED (results differ by more than 1e-4):\n  " + "\n  ".join(failures))
        return 1
    print(f"\nall grids agree with TransformerLens to <= {TOL:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
