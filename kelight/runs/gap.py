"""``kelight gap RUN...``: how far a run's teacher-forced scores are from what the edited model says.

A run with ``--model.eval_protocol both`` scores every probe twice: teacher-forced (the likelihood of
the right target against the wrong one) and by the answer the model generates (``wild_*``). For each
score it has both ways — ES/wild_ES, PS/wild_PS, RES/wild_RES, NS/wild_NS, RS/wild_RS, DNS/wild_DNS,
Efficacy/wild_Efficacy, Generality/wild_Generality, Locality/wild_Locality — this reports both pooled
values and the gap ``teacher-forced − wild`` in points, with a paired case-bootstrap 95% interval (the
two protocols score the same prompts of each case, so the cases are resampled together;
:func:`~kelight.evaluation.stats.paired_difference_interval`).

The pairs do not always ask the same question. ES/PS/RES, Efficacy and Generality do (did the edit
take?); NS/RS/DNS ask under teacher forcing whether o_true still beats o_edit, generated whether the
answer avoids o_edit (a small model that never knew o_true does not fail it), and Locality compares
tokens with the unedited model's under teacher forcing, the whole answer generated. A positive gap on an
edit score is what "The Mirage of Model Editing" (Yang et al., ACL 2025) measures: teacher forcing
credits edits the model does not say.

With ``examples`` > 0, each edit score (those where a good answer *gives* a target) also quotes up to that
many generated answers that miss, from cases whose teacher-forced score of the pair is 100 (so each of
their prompts took under teacher forcing): what the gap looks like.

Example:
    kelight gap runs/wild/dev50/rome runs/wild/dev50/rome_sadr
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from kelight.runs.compare import INTERVAL_NOTE, compare_pair, difference_cell, read_cases
from kelight.runs.report import run_names
from kelight.types import PROBE_GROUPS, TOKEN_GROUPS, WILD_GROUPS

#: probe or token group -> (teacher-forced score, its wild score), in report order
PAIRS: dict[str, tuple[str, str]] = {
    group: (PROBE_GROUPS[group][0] if group in PROBE_GROUPS else TOKEN_GROUPS[group], wild)
    for group, (wild, _) in WILD_GROUPS.items()
}


def _as_teacher_forced(rows: Mapping[object, Mapping]) -> dict[object, dict]:
    """Each row with its wild scores under their teacher-forced names (``wild_ES`` as ``ES``), so the
    run's two protocols compare as two runs on the same cases."""
    out = {}
    for case_id, row in rows.items():
        out[case_id] = {"id": case_id}
        for tf, wild in PAIRS.values():
            if wild in row:
                out[case_id] |= {tf: row[wild], f"n_{tf}": row.get(f"n_{wild}")}
    return out


def gap_pairs(rows: Mapping[object, Mapping], n_resamples: int = 2000,
              seed: int = 0) -> dict[str, tuple[float, float, float, float, float, int]]:
    """Per score a run has both ways: ``(teacher-forced, wild, tf − wild, low, high, cases)``.

    Raises:
        ValueError: if the run has no wild score (it was not run with ``--model.eval_protocol both``), or a
            case scores one probe group on different prompt counts in the two protocols.
    """
    wild = _as_teacher_forced(rows)
    if not any(len(row) > 1 for row in wild.values()):
        raise ValueError("the run has no wild score; run it with --model.eval_protocol both")
    teacher_forced = {}
    for case_id, row in rows.items():
        teacher_forced[case_id] = {k: row[k] for k in wild[case_id] if k in row}
        for tf, w in PAIRS.values():
            if tf in wild[case_id] and row.get(f"n_{tf}") != row.get(f"n_{w}"):
                raise ValueError(f"case {case_id!r} scores {tf} on {row.get(f'n_{tf}')} prompts and {w} on "
                                 f"{row.get(f'n_{w}')}; the two protocols must score the same prompts (a run "
                                 f"with --model.eval_protocol both does)")
    compared = compare_pair(wild, teacher_forced, n_resamples, seed)  # (wild, tf, tf − wild, low, high, cases)
    return {score: (tf, w, *rest) for score, (w, tf, *rest) in compared.items()}


def missed_answers(rows: Mapping[object, Mapping], examples: int) -> dict[str, list[dict]]:
    """Per edit score (a good answer gives the target), up to ``examples`` generated answers that miss it,
    from cases whose teacher-forced score of that group is 100 (in case order)."""
    out: dict[str, list[dict]] = {}
    for group, (tf, _) in PAIRS.items():
        if WILD_GROUPS[group][1] != "gives":
            continue
        missed = [{"id": row["id"], **a} for row in rows.values() if row.get(tf) == 100.0
                  for a in row.get("wild", ()) if a.get("group") == group and not a.get("match")]
        if missed[:examples]:
            out[tf] = missed[:examples]
    return out


def _quote(text: str, width: int = 90) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= width else text[: width - 1] + "…"


def gap_report(run_dirs: Sequence[str | Path], examples: int = 2, n_resamples: int = 2000, seed: int = 0) -> str:
    """Markdown: per run and score the two protocols' values and their gap; then the quoted answers."""
    names = run_names(run_dirs)
    lines = ["| run | score | teacher-forced | wild | teacher-forced − wild [95% CI] | cases |",
             "|---|---|---|---|---|---|"]
    quotes = []
    for name, run_dir in zip(names, run_dirs, strict=True):
        rows = read_cases(run_dir)
        try:
            pairs = gap_pairs(rows, n_resamples, seed)
        except ValueError as err:
            raise ValueError(f"{run_dir}: {err}") from None
        for score, (tf, wild, diff, low, high, n) in pairs.items():
            lines.append(f"| {name} | {score} | {tf:.1f} | {wild:.1f} | {difference_cell(diff, low, high)} | {n} |")
        for score, answers in missed_answers(rows, examples).items():
            quotes += [f"- {name}, {score} 100 (case {a['id']}): {_quote(a['prompt'])!r} → {_quote(a['answer'])!r} "
                       f"(target {_quote(a['target'], 40)!r})" for a in answers]
    text = "\n".join(lines) + "\n\n" + INTERVAL_NOTE
    if quotes:
        text += "\n\nGenerated answers that miss where teacher forcing scored every prompt of the case:\n"
        text += "\n".join(quotes)
    return text
