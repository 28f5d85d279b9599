"""Loss terms of the value-vector / path optimisation: rewrite NLL, essence KL, SADR, contrastive."""

from kelight.objectives.essence import essence_kl
from kelight.objectives.rewrite import rewrite_nll

__all__ = ["essence_kl", "rewrite_nll"]
