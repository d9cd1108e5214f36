"""Per-token distillation to a teacher's distribution (Hinton et al. 2015; Fu et al. 2023).

:func:`distill_objective` is a next-token :class:`~.losses.Objective` whose batches carry
``teacher_logprobs`` (batch, pos, vocab): the teacher's log-probabilities of the token at
``pos + 1``. On the target positions of ``loss_mask`` the loss is
``(1 - alpha) * NLL(student) + alpha * KL(p_teacher || p_student)``, summed like every
objective (the loop divides once by the batch's weight).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mechinterp.train.losses import OBJECTIVES, Objective, _field, _target_mask, next_token_terms


def token_kl(student_logits: jax.Array, teacher_logprobs: jax.Array) -> jax.Array:
    """KL(teacher || student) per position, (batch, pos): sum_v p_t (log p_t - log p_s)."""
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32), -1)
    log_t = teacher_logprobs.astype(jnp.float32)
    return jnp.sum(jnp.exp(log_t) * (log_t - log_s), -1)


def distill_objective(alpha: float) -> Objective:
    """Next-token NLL mixed with per-token KL to ``batch['teacher_logprobs']``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the KL's weight) must be in [0, 1], got {alpha}")

    def terms(logits, batch):
        out = next_token_terms(logits, batch)
        teacher = _field(batch, "teacher_logprobs", "distill")
        if teacher.shape != logits.shape:
            raise ValueError(f"teacher_logprobs has shape {teacher.shape}, the student's "
                             f"logits {logits.shape}: give the teacher's log-probabilities "
                             "at every position over the same vocabulary")
        kl = jnp.sum(token_kl(logits[:, :-1], teacher[:, :-1]) * _target_mask(batch))
        return {**out, "nll": out["loss"], "kl": kl,
                "loss": (1.0 - alpha) * out["loss"] + alpha * kl}

    base = OBJECTIVES["next_token"]
    return Objective(name="next_token", inputs=base.inputs, weight=base.weight, terms=terms)
