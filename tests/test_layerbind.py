"""LayerBind (configs/layerbind.py): branch masks, layer-order fusion and nursing on an
analytic velocity field, the masks on a real one-layer DiT, and the smoke run."""

import json

import jax.numpy as jnp
import numpy as np

from mechinterp.experiments.layerbind import binding
from mechinterp.models.dit import DiT
from random_params import random_variables

NULL, SLOT, PATCH = 9, 2, 2


def boxes():
    regions = np.zeros((1, 2, 8, 8), bool)
    regions[0, 0, :4, :4] = regions[0, 1, 2:6, 2:6] = True
    return regions


def test_token_regions_and_branch_masks():
    regions = boxes()
    tok = binding.token_regions(regions, PATCH)
    assert tok.shape == (1, 2, 16) and tok[0, 0].sum() == 4 and tok[0, 1].sum() == 4
    assert tok[0, 0, 0] and tok[0, 0, 5] and not tok[0, 0, 2]  # patch (0,0), (1,1) vs (0,2)
    cond = np.array([[1, 5, 2, 6]])
    cond_b, mask_b = binding.branch_inputs(cond, regions, np.array([[1, 0]]), patch=PATCH,
                                           slot=SLOT, null=NULL)
    np.testing.assert_array_equal(cond_b[0], [[NULL, NULL, 2, 6], [1, 5, NULL, NULL]])
    outside = ~tok[0, 1]  # branch 0 is instance 1: its tokens 2, 3 hidden outside its region
    np.testing.assert_array_equal(mask_b[0, 0, 4:, 2], tok[0, 1])
    assert mask_b[0, 0, 4:, :2].all() and mask_b[0, 0, :4].all() and outside.sum() == 12


def targets(cond):
    """An analytic model: every pixel of an image goes to the sum of its present colour ids."""
    c = np.asarray(cond)
    return jnp.asarray(np.where(c[:, ::SLOT] == NULL, 0, c[:, ::SLOT] + 1).sum(1),
                       jnp.float32)[:, None, None, None]


def velocity(x, t, cond, mask):
    return 1.0 * (x - targets(cond))  # one Euler step of size 1 lands on the target


def test_fusion_composites_the_branches_in_layer_order():
    regions, cond = boxes(), np.array([[1, 5, 2, 6]])
    noise = np.zeros((1, 8, 8, 1), np.float32)
    for order, top in (([0, 1], 3.0), ([1, 0], 2.0)):
        out = np.asarray(binding.layerbind_sample(velocity, noise, cond, regions, np.array([order]),
                                                  n_steps=1, fuse=1, beta=1.0, patch=PATCH,
                                                  slot=SLOT, null=NULL))[0, ..., 0]
        assert out[3, 3] == top  # the overlap shows the upper instance (ids 1 -> 2, 2 -> 3)
        assert out[0, 0] == 2.0 and out[5, 5] == 3.0
        bottom = 2.0 if order[0] == 0 else 3.0
        assert out[7, 7] == bottom  # outside every region: the bottom branch's background
    # fuse at 0: one nursing step at full transparency, global outside the regions
    out = np.asarray(binding.layerbind_sample(velocity, noise, cond, regions, np.array([[0, 1]]),
                                              n_steps=1, fuse=0, beta=1.0, patch=PATCH,
                                              slot=SLOT, null=NULL))[0, ..., 0]
    assert out[7, 7] == 5.0 and out[0, 0] == 2.0 and out[3, 3] == 3.0


def test_branch_mask_cuts_the_instance_off_outside_its_region_in_a_dit():
    model = DiT(image_size=8, channels=1, patch_size=PATCH, d_model=8, n_layers=1, n_heads=1,
                d_mlp=8, n_classes=0, cond_vocab=NULL + 1, n_cond=4, freq_dim=8)
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 1)).astype(np.float32)
    params = random_variables(model, x, jnp.ones(1), cond=np.zeros((1, 4), np.int32))
    regions = boxes()
    outs = []
    for inst in ([1, 5], [3, 7]):
        cond = np.array([[*inst, 2, 6]])
        cond_b, mask_b = binding.branch_inputs(cond, regions, np.array([[0, 1]]), patch=PATCH,
                                               slot=SLOT, null=NULL)
        outs.append(np.asarray(model.apply(params, x, jnp.full(1, 0.5), cond=cond_b[:, 0],
                                           attn_mask=mask_b[:, 0]))[0, ..., 0])
    changed = np.abs(outs[0] - outs[1]) > 1e-6
    assert changed[regions[0, 0]].all() and not changed[~regions[0, 0]].any()


def test_smoke_run_scores_every_fusion_step(smoke_run):
    workdir = smoke_run("layerbind")
    results = json.loads((workdir / "results.json").read_text())
    run = results["per_seed"][0]
    assert set(run) == {"plain", "fuse0", "fuse1", "fuse2"}
    for scores in run.values():
        assert 0 <= scores["adherence"] <= 1 and 0 <= scores["both_present"] <= 1
        assert 0 <= scores["order_accuracy"] <= 1
    assert (workdir / "samples.png").stat().st_size > 1000
    report = (workdir / "report.md").read_text()
    assert "| fuse2 |" in report and "occlusion-order accuracy" in report
