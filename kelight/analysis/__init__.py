"""Analyses of edited models (SADR paper §3): attention drift, contaminating substitution,
attention-weight patching, SADR head selection, and the sweep trade-off plot.

Import the submodule you need (this package imports nothing heavy on its own)::

    from kelight.analysis.drift import run_drift            # Figure 4 / Table 2
    from kelight.analysis.substitution import run_substitution  # Figure 3
    from kelight.analysis.patching import run_patching      # Figure 5
    from kelight.analysis.heads import run_heads            # SADR head selection
    from kelight.analysis.tradeoff import plot_tradeoff     # Figure 7, from a sweep summary

Every ``run_*`` takes ``(model, tok, cases, edit, out_dir)``, where ``edit(model, tok, request)``
edits in place and returns an undo handle (:func:`kelight.analysis.common.editor_edit`), and
writes ``<name>.json`` + ``<name>.png``. The model's weights are restored after every edit.
The command line is ``kelight analyze <name> --config C --out DIR`` (:mod:`kelight.cli.analyze`).
"""
