"""Random variables for a model without running its ``init``: shapes from ``jax.eval_shape``,
values drawn with numpy. Compiling a ViT's ``init`` takes ~12 s on CPU (its random
initializers); the tests need random weights anyway (off ones/zeros, so a mapping mistake
cannot hide)."""

import flax.linen as nn
import jax
import numpy as np


def random_variables(model, *inputs, scale=0.3, seed=0, **kwargs):
    """``{"params": N(0, scale) everywhere, "batch_stats": mean 0, var 1}``, as ``init``
    would lay them out for ``inputs``."""
    rng = np.random.default_rng(seed)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs, **kwargs))
    params = jax.tree.map(lambda s: (scale * rng.normal(size=s.shape)).astype(s.dtype),
                          shapes["params"])
    stats = jax.tree_util.tree_map_with_path(
        lambda path, s: np.full(s.shape, float(path[-1].key == "var"), s.dtype),
        shapes.get("batch_stats", {}))
    return {"params": params, "batch_stats": stats} if stats else {"params": params}
