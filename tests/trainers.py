"""The Lightning trainer tests run modules with: one CPU process, no logger, checkpoints, progress bar or summary."""

from __future__ import annotations

import lightning as L


def quiet_trainer(root, max_epochs: int = 1, **kwargs) -> L.Trainer:
    """A trainer writing into ``root`` (``kwargs``: further Trainer arguments, e.g. ``callbacks``)."""
    return L.Trainer(max_epochs=max_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", default_root_dir=str(root), **kwargs)
