"""General-vs-domain perplexity of a real model on texts found offline on this machine.

General English: the Apache License 2.0 text (``/usr/share/common-licenses/Apache-2.0``,
shipped by Debian's base-files; the licence itself may be copied verbatim). Domain (code):
the Python standard library's ``textwrap.py`` (Python Software Foundation License).
Neither is downloaded. :func:`token_perplexity` works on any ``logits(tokens)``;
:func:`general_vs_domain` runs it on a :func:`mechinterp.load` model (e.g. SmolLM2).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

TEXTS = {
    "general": (Path("/usr/share/common-licenses/Apache-2.0"),
                "Apache License 2.0 text (verbatim copying permitted)"),
    "domain": (Path(textwrap.__file__), "CPython Lib/textwrap.py (PSF License)"),
}


def token_perplexity(logits_fn, tokens, window: int) -> float:
    """``exp`` of the mean next-token cross entropy of ``tokens`` (1-D ids) read in
    non-overlapping windows of ``window`` tokens (each window predicts its own positions
    1..window-1); a last partial window is dropped."""
    tokens = np.asarray(tokens)
    n = len(tokens) // window
    if n < 1 or window < 2:
        raise ValueError(f"need at least one window of >= 2 tokens, got {len(tokens)} tokens "
                         f"and window={window}")
    rows = jnp.asarray(tokens[:n * window].reshape(n, window), jnp.int32)
    logp = jax.nn.log_softmax(jnp.asarray(logits_fn(rows), jnp.float32)[:, :-1], -1)
    nll = -jnp.take_along_axis(logp, rows[:, 1:, None], -1)
    return float(math.exp(float(nll.mean())))


def general_vs_domain(lm, n_tokens: int = 512, window: int = 128) -> dict:
    """Perplexity of ``lm`` (a :class:`mechinterp.language_model.LanguageModel`) on the first
    ``n_tokens`` tokens of each text, with the text's source and licence."""
    out = {}
    for side, (path, licence) in TEXTS.items():
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the {side} text of {__name__} is "
                                    "read from this machine, not downloaded")
        ids = np.asarray(lm.to_tokens(path.read_text(), prepend_bos=False)).ravel()[:n_tokens]
        out[side] = {"perplexity": token_perplexity(lambda t: lm(t), ids, window),
                     "tokens": int(len(ids)), "source": str(path), "licence": licence}
    return out
