"""Expert Pyramid Tuning adapters (form inferred from the abstract; see docs/decisions.md).

One shared low-dimensional seed ``S`` (r, r); expert ``e`` expands it with a transposed
convolution of kernel ``K_e`` (k_e, k_e), stride 1 (a full 2-D convolution), to
``M_e = S *T K_e`` of size (r + k_e - 1)^2, and projects it to a low-rank weight delta
``D_e = P_e M_e Q_e`` (d_in, d_out) of rank <= r + k_e - 1: a pyramid of scales from one
seed. A task-aware router mixes them, ``D_t = sum_e softmax(R_t)_e D_e``, and the layer is
``y = x (W + D_t) + b`` with ``W``, ``b`` the frozen base. ``Q_e`` starts at zero, so the
adapted layer starts equal to the base; :func:`merged_kernel` bakes ``D_t`` into ``W``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def expand_seed(seed: jax.Array, kernel: jax.Array) -> jax.Array:
    """Transposed convolution (stride 1) of ``seed`` by ``kernel``: (r + k - 1)^2."""
    return jax.scipy.signal.convolve2d(seed, kernel, mode="full")


class PyramidDense(nn.Module):
    """A dense layer with a frozen base (``kernel``, ``bias``) and pyramid experts.

    ``kernel_sizes``: one expert per size (``(1,)`` with no router is a single LoRA of rank
    ``seed_rank``); ``n_tasks``: rows of the router (the task index is an input).
    """

    d_in: int
    features: int
    n_tasks: int
    seed_rank: int = 4
    kernel_sizes: Sequence[int] = (1, 3, 5)
    scale: float = 1.0

    def setup(self):
        if self.seed_rank < 1 or not self.kernel_sizes or min(self.kernel_sizes) < 1:
            raise ValueError(f"PyramidDense needs seed_rank >= 1 and kernel sizes >= 1, got "
                             f"seed_rank={self.seed_rank}, kernel_sizes={self.kernel_sizes}")
        r, normal = self.seed_rank, nn.initializers.normal
        self.seed = self.param("seed", normal(1.0), (r, r))
        self.kernels = [self.param(f"kernel{k}", normal(1.0 / k), (k, k))
                        for k in self.kernel_sizes]
        self.router = self.param("router", nn.initializers.zeros, (self.n_tasks,
                                                                   len(self.kernel_sizes)))
        sizes = [r + k - 1 for k in self.kernel_sizes]
        self.p = [self.param(f"P{k}", normal(self.d_in ** -0.5), (self.d_in, n))
                  for k, n in zip(self.kernel_sizes, sizes)]
        self.q = [self.param(f"Q{k}", nn.initializers.zeros, (n, self.features))
                  for k, n in zip(self.kernel_sizes, sizes)]
        self.base = nn.Dense(self.features)

    def expert_deltas(self) -> jax.Array:
        """Every expert's ``D_e``: (experts, d_in, features)."""
        return jnp.stack([self.scale * (p @ expand_seed(self.seed, kernel) @ q) / q.shape[0]
                          for kernel, p, q in zip(self.kernels, self.p, self.q)])

    def task_delta(self, task) -> jax.Array:
        """``D_t`` for each task index in ``task`` (shape ``task.shape + (d_in, out)``)."""
        gates = jax.nn.softmax(self.router[task], -1)
        return jnp.einsum("...e,eio->...io", gates, self.expert_deltas())

    def __call__(self, x, task):
        """``x`` (batch, d_in), ``task`` (batch,) ints: ``x (W + D_task) + b``."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"PyramidDense(d_in={self.d_in}) got inputs of width "
                             f"{x.shape[-1]}; build it with d_in={x.shape[-1]}")
        return self.base(x) + jnp.einsum("bi,bio->bo", x, self.task_delta(task))


def merged_kernel(layer: PyramidDense, params, task: int) -> jax.Array:
    """The base kernel with task ``task``'s mixed delta added: one plain dense layer."""
    delta = layer.apply({"params": params}, jnp.asarray(task), method=PyramidDense.task_delta)
    return params["base"]["kernel"] + delta
