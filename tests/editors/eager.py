"""The reference for the editors that train weights: SADR reading eager ``T × T`` attention."""

from kelight.editors.zopt import StepState, _forward_logprobs
from kelight.lm import attention_implementation


def eager_step_forward(model, batch, step, want_rows):
    """:func:`kelight.editors.zopt.step_forward` with eager attention weights in ``outputs.attentions``."""
    with attention_implementation(model, "eager" if want_rows else None):
        tgt, _, outputs = _forward_logprobs(model, batch, want_attn=want_rows)
    return tgt, StepState(step, batch, outputs)
