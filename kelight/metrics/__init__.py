"""Edit metrics: torchmetrics classes (:mod:`.classes`) over pure math (:mod:`.functional`)."""

from kelight.metrics.classes import EditMetrics, Fluency, PairwiseScore, Perplexity, TokenAccuracy, WildScore

__all__ = ["EditMetrics", "Fluency", "PairwiseScore", "Perplexity", "TokenAccuracy", "WildScore"]
