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
  (``generic_activation_patch``). Ours evaluates the same cells, ``chunk`` at a time, as
  ``ceil(cells / chunk)`` calls of one jitted ``vmap`` of the patched forward.
- FLOPs: analytic matmul FLOPs (2 per multiply-add) of one forward times the forwards; for
  TransformerLens cross-checked with ``torch.utils.flop_counter.FlopCounterMode`` on one
  hooked forward. For ours also XLA's count: ``jax.jit(chunk_fn).lower(...).compile()
  .cost_analysis()["flops"]`` times the chunk calls (padding included). XLA's cost analysis
  counts the body of a ``while`` loop once, so a scanned model (``nn.scan`` over layers,
  load_hf's default) is under-counted about ``n_layers`` times; the XLA count is therefore
  taken on the same model loaded unrolled (``scan_layers=False``: identical numbers).
- time: median wall time over ``--runs`` runs (>= 3). Ours is timed three ways: the first
  public call (trace + compile + run), later public calls, and the compiled chunk function
  alone (what a call costs when its compilation is cached). Compile time inside each public
  call is read from JAX's own monitoring events (jaxpr tracing, lowering, backend compile).
- TransformerLens runs with the torch thread count (1 or all cores) that is fastest for one
  hooked forward on this machine, measured first: on a shared CPU, intra-op threads can
  make small torch ops many times slower.
- max |ours - TL| over each grid (must be <= 1e-4) and the grid's value range.
"""

from __future__ import annotations

import argparse
import math
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
import mechinterp.sweep as mi_sweep
from mechinterp import patching
from mechinterp.metrics import logit_diff
from mechinterp.models import load_hf

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


def reuse_flops(cfg, grid, answer_only_last_layer=False, answer_columns_only=False):
    """Mean analytic FLOPs per cell if the sweep skipped work a patch cannot change (issue 3,
    item 5): layers below the patched one, and (causal attention) every position before the
    patched one, whose keys and values are reused. Optionally also the last layer at
    positions other than the answer's (the metric reads one position), and the
    unembedding of all but the two answer columns (logit difference reads two).

    ``resid_pre`` at (layer l, pos p): layers l.. for positions p..; ``attn_head_out_by_pos``
    at (l, p, h): layer l's MLP at position p only, then layers l+1.. for positions p...
    A projection of what such an engine would execute, not a measurement.
    """
    b, s, d = cfg["batch"], cfg["seq"], cfg["d_model"]
    h, kv, dh, n_layers = cfg["n_heads"], cfg["n_kv_heads"], d // cfg["n_heads"], cfg["n_layers"]
    q_o, k_v, mlp = 2 * d * h * dh, 2 * d * kv * dh, 3 * d * cfg["d_mlp"]

    def layer(queries, new_kv):  # attention over all s keys: an upper bound
        return 2 * b * (queries * (q_o + mlp) + new_kv * k_v) + 4 * b * h * queries * s * dh

    unembed = 2 * b * d * (2 if answer_columns_only else cfg["vocab"])
    total = 0
    for l in range(n_layers):
        for p in range(s):
            flops = unembed
            first = l
            if grid == "attn_head_out_by_pos":
                flops += 2 * b * mlp
                first = l + 1
            for k in range(first, n_layers):
                last = answer_only_last_layer and k == n_layers - 1
                flops += layer(1 if last else s - p, s - p)
            total += flops
    return total / (n_layers * s)


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


class ChunkSpy:
    """Records what the sweep engine hands its chunk runner (``mechinterp.sweep
    .map_in_chunks(fn, items, shared, chunk_size, ...)``), so the jitted chunk function can
    be lowered, costed and timed on its own. If the engine has no such function (it is free
    to change), the benchmark falls back to analytic FLOPs and public-call timings. With
    ``run=False`` the chunks are not evaluated (the sweep returns zeros)."""

    def __init__(self, run=True):
        self.calls = []
        self.run = run
        self.original = getattr(mi_sweep, "map_in_chunks", None)

    def __enter__(self):
        if self.original is not None:
            def spy(fn, items, shared, chunk_size, *args, **kwargs):
                self.calls.append((fn, items, tuple(shared), int(chunk_size)))
                if not self.run:
                    return np.zeros(len(jax.tree.leaves(items)[0]), np.float32)
                return self.original(fn, items, shared, chunk_size, *args, **kwargs)
            mi_sweep.map_in_chunks = spy
        return self

    def __exit__(self, *exc):
        if self.original is not None:
            mi_sweep.map_in_chunks = self.original


def balanced(n, chunk_size):
    """The chunk size the engine uses: ceil(n / chunk_size) chunks of equal size."""
    return -(-n // -(-n // chunk_size))


def chunk_runner(fn, items, shared, chunk_size):
    """jit(vmap(fn)) compiled for one chunk, and a function running every chunk with it."""
    items = np.asarray(items)
    n = len(items)
    chunk_size = balanced(n, chunk_size)
    jitted = jax.jit(jax.vmap(fn, in_axes=(0,) + (None,) * len(shared)))
    start = time.perf_counter()
    compiled = jitted.lower(items[:chunk_size], *shared).compile()
    compile_s = time.perf_counter() - start
    n_chunks = math.ceil(n / chunk_size)
    padded = np.concatenate([items, np.repeat(items[-1:], n_chunks * chunk_size - n, 0)])
    chunks = [jnp.asarray(padded[i * chunk_size:(i + 1) * chunk_size]) for i in range(n_chunks)]

    def run_all():
        outs = [compiled(chunk, *shared) for chunk in chunks]
        return np.concatenate([np.asarray(o) for o in outs])[:n]

    return compiled, compile_s, n_chunks, run_all


def xla_flops(compiled):
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


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
    parser.add_argument("--chunk-size", type=int, action="append", default=None,
                        help="also time ours with this many cells per jitted call "
                             "(repeatable; the engine's memory-budget default always runs)")
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
        model_unrolled, params_unrolled = load_hf(folder, scan_layers=False)

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
    our_forward = forward_flops(cfg, logit_positions=1)
    sites = [site for site, _ in (GRIDS[g] for g in grids)]
    _, cache = mechinterp.capture(model, params, clean_j, sites=sites)
    _, cache_unrolled = mechinterp.capture(model_unrolled, params_unrolled, clean_j,
                                           sites=sites)
    clock = CompileClock()

    rows, failures, notes = [], [], []
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

        # Ours, through the public call: first call, then later calls.
        def our_call(chunk_size=None, m=model, p=params, c=cache, name=name):
            return np.asarray(getattr(patching, name)(m, p, corrupted_j, c, metric,
                                                      progress=False, chunk_size=chunk_size))

        clock.reset()
        with ChunkSpy() as spy:
            start = time.perf_counter()
            ours = our_call()
            first_s = time.perf_counter() - start
        first_compile = clock.seconds
        later, later_compile = [], []
        for _ in range(args.runs):
            clock.reset()
            start = time.perf_counter()
            again = our_call()
            later.append(time.perf_counter() - start)
            later_compile.append(clock.seconds)
        later_s, later_c = statistics.median(later), statistics.median(later_compile)
        recompiles = clock.backend_compiles > 0
        diff = float(np.max(np.abs(ours - tl_grid)))
        if ours.shape != tl_grid.shape or not diff <= TOL:
            failures.append(f"{grid}: max |ours - TL| = {diff:.2e} (shapes {ours.shape} vs "
                            f"{tl_grid.shape})")
        assert np.array_equal(ours, again)
        print(f"  ours public call: first {first_s:.2f} s (compile {first_compile:.2f} s), "
              f"later median {later_s:.2f} s (compile inside {later_c:.2f} s"
              f"{', recompiled every call' if recompiles else ''})")

        chunk = balanced(cells, spy.calls[0][3]) if spy.calls else None
        n_calls = math.ceil(cells / chunk) if chunk else None
        rows.append(dict(side="TransformerLens", grid=grid, cells=cells,
                         calls=f"{cells} (1 per cell)", flops=cells * tl_forward,
                         xla=None, median=tl_s, compile=None, ratio=None, diff=None,
                         rng=float(np.ptp(tl_grid))))
        rows.append(dict(side="ours: public call", grid=grid, cells=cells,
                         calls=f"{n_calls} x {chunk}" if chunk else "?",
                         flops=cells * our_forward, xla=None, median=later_s,
                         compile=f"{first_compile:.2f} first, {later_c:.2f} later",
                         first=first_s, ratio=tl_s / later_s, diff=diff, rng=None))

        # Ours, the compiled chunk function alone (compilation cached), per chunk size.
        if not spy.calls:
            notes.append("mechinterp.sweep.map_in_chunks not found: no exec-only timing, "
                         "no XLA FLOP count")
            continue
        fn, items, shared, default_chunk = spy.calls[0]
        with ChunkSpy(run=False) as spy_unrolled:  # only to cost the unrolled twin
            our_call(m=model_unrolled, p=params_unrolled, c=cache_unrolled)
        sizes = {balanced(cells, default_chunk): "default"}
        for size in args.chunk_size or []:
            sizes.setdefault(balanced(cells, size), "--chunk-size")
        for size, label in sizes.items():
            _, compile_s, n_chunks, run_all = chunk_runner(fn, items, shared, size)
            exec_s, values = median_time(run_all, args.runs)
            exec_diff = float(np.max(np.abs(values.reshape(ours.shape) - tl_grid)))
            if not exec_diff <= TOL:
                failures.append(f"{grid} chunk {size}: max |ours - TL| = {exec_diff:.2e}")
            xla = None
            if spy_unrolled.calls:
                fn_u, items_u, shared_u, _ = spy_unrolled.calls[0]
                compiled_u = chunk_runner(fn_u, items_u, shared_u, size)[0]
                per_chunk = xla_flops(compiled_u)
                xla = None if per_chunk is None else per_chunk * n_chunks
            print(f"  ours compiled chunk fn, chunk {size} ({label}): compile {compile_s:.2f} s,"
                  f" {n_chunks} calls, median {exec_s:.2f} s")
            rows.append(dict(side=f"ours: compiled chunk fn, {label}", grid=grid, cells=cells,
                             calls=f"{n_chunks} x {size}",
                             flops=cells * our_forward, xla=xla, median=exec_s,
                             compile=f"{compile_s:.2f}", ratio=tl_s / exec_s, diff=exec_diff,
                             rng=None))

    # ---------------------------------------------------------------- table
    print("\nFLOPs: analytic matmul FLOPs per forward x forwards (see forward_flops). "
          f"TransformerLens forward: {tl_forward / 1e9:.3f} GFLOP analytic, "
          f"{tl_forward_measured / 1e9:.3f} GFLOP by torch FlopCounterMode; ours per cell: "
          f"{our_forward / 1e9:.3f} GFLOP analytic (a full forward, logits at 1 position). "
          "'XLA' = cost_analysis of the compiled chunk function (unrolled twin) x calls, "
          "padding included.")
    print(f"TransformerLens ran with torch threads = {threads}, under torch.inference_mode. "
          "'first s' = our first public call (trace + compile + run); 'median s' = later "
          "calls; GFLOP/s uses the XLA count where there is one.\n")
    header = (f"{'grid':<21} {'side':<36} {'cells':>6} {'jitted calls':>12} "
              f"{'FLOPs':>9} {'XLA FLOPs':>9} {'GFLOP/s':>7} {'first s':>7} {'median s':>8} "
              f"{'compile s':>19} {'TL/ours':>7} {'max|diff|':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        tl = r["side"] == "TransformerLens"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.1f}x"
        diff = "" if r["diff"] is None else f"{r['diff']:.1e}"
        first = f"{r['first']:.2f}" if r.get("first") else "-"
        rate = (r["xla"] or r["flops"]) / r["median"] / 1e9
        print(f"{r['grid']:<21} {r['side']:<36} {r['cells']:>6} "
              f"{'-' if tl else r['calls']:>12} {fmt_flops(r['flops']):>9} "
              f"{'-' if tl else fmt_flops(r['xla']):>9} {rate:>7.1f} {first:>7} "
              f"{r['median']:>8.2f} {r['compile'] or '-':>19} {ratio:>7} {diff:>9}")
    for r in rows:
        if r["rng"] is not None:
            print(f"{r['grid']}: TransformerLens grid values span {r['rng']:.3f} "
                  f"(so a 1e-4 agreement is meaningful)")
    mlp_flops = cfg["n_layers"] * 2 * b * s * 3 * cfg["d_model"] * cfg["d_mlp"]
    body_flops = forward_flops(cfg, logit_positions=0)
    print(f"\nWhere our FLOPs go, per cell (analytic): MLPs {mlp_flops / 1e9:.3f} G, attention "
          f"{(body_flops - mlp_flops) / 1e9:.3f} G, unembedding at the answer position "
          f"{(our_forward - body_flops) / 1e9:.3f} G. Today every cell runs a full forward.")
    print("Projected FLOPs per cell if unchanged work were reused (issue item 5; analytic, "
          "not measured) and the TL/ours FLOP ratio it would give:")
    for grid in grids:
        variants = [("layers below + positions before the patch", {}),
                    ("... + last layer at the answer position only", dict(answer_only_last_layer=True)),
                    ("... + only the 2 answer columns of the unembedding",
                     dict(answer_only_last_layer=True, answer_columns_only=True))]
        for label, kw in variants:
            per_cell = reuse_flops(cfg, grid, **kw)
            print(f"  {grid:<21} {label:<52} {per_cell / 1e9:.3f} G  ->  "
                  f"{tl_forward / per_cell:.1f}x (today {tl_forward / our_forward:.1f}x)")
    for note in notes:
        print("note:", note)
    if failures:
        print("\nFAILED (results differ by more than 1e-4):\n  " + "\n  ".join(failures))
        return 1
    print(f"\nall grids agree with TransformerLens to <= {TOL:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
