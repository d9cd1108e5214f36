"""The residual dilated-convolution trunk of the layered decomposers (LayerDecomp's
``Decomposer``, workflow layers' ``LayerNet``)."""

from __future__ import annotations

import flax.linen as nn


def trunk(x, width: int, dilations):
    """``h = stem(x)``, then ``h = h + conv_k(gelu(h))`` with dilation ``d_k``, 3x3 kernels.

    Call it inside the caller's ``@nn.compact`` method: the convolutions (``stem``,
    ``conv0`` ...) are the caller's own submodules, so parameter names stay flat."""
    h = nn.Conv(width, (3, 3), name="stem")(x)
    for k, d in enumerate(dilations):
        h = h + nn.Conv(width, (3, 3), kernel_dilation=d, name=f"conv{k}")(nn.gelu(h))
    return h
