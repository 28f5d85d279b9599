"""EditModule behaviour not tied to one editor."""

from __future__ import annotations


def test_long_runs_log_progress(tmp_path, caplog):
    import logging

    import lightning as L

    from kelight.data.datamodule import EditDataModule
    from kelight.module import ROME

    module = ROME(model_name="tiny:llama", layer=1, steps=2, context_templates=[], mom2_adjustment=False,
                  fluency=False, regime="sequential")
    module.progress_seconds = 0.0  # every edit
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="kelight.module"):
        trainer.fit(module, datamodule=EditDataModule(path=None, batch_size=2, limit=4))
    lines = [r.getMessage() for r in caplog.records if "edits done" in r.getMessage()]
    # the sequential regime edits a loader batch of 2 one case at a time; the total counts cases, not batches
    assert [line.split(" edits")[0] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]  # done / this process's total
    assert "sequential regime" in lines[-1]
    assert lines[0].endswith("min left") and lines[-1].endswith("about 0.0 min left")
