"""Independent edits optimised together (``z_batch``) equal one-at-a-time optimisation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from kelight.editors.locate.zopt import ZConfig, optimise_z, optimise_zs
from kelight.editors.memit import MemitEditor, MemitHParams
from kelight.editors.rewrite import build_rewrite_batch, merge_rewrite_batches
from kelight.editors.undo import UndoLog
from kelight.models.adapters import adapter_for
from kelight.objectives.sadr import SADR
from kelight.types import EditInputError, EditRequest

REQUESTS = [
    EditRequest("The Eiffel Tower is located in", "Eiffel Tower", "Rome"),
    EditRequest("Mount Fuji, the mountain, is in", "Mount Fuji", "the south of Peru"),
    EditRequest("Danielle Darrieux speaks", "Danielle Darrieux", "English"),
]
TEMPLATES = ["{}", "Yes. {}", "It was a long day. {}"]
LAYER = 1


def _separately(model, tok, cfg, gamma=0.0):
    path = adapter_for(model).path("mlp_out", LAYER)
    out = []
    for request in REQUESTS:
        terms = (SADR(gamma, LAYER + 1),) if gamma else ()
        batch = build_rewrite_batch(tok, request, TEMPLATES, "cpu")
        out.append(optimise_z(model, path, batch, cfg, terms, want_attn=bool(terms), first_edited_block=LAYER))
    return out


def _together(model, tok, cfg, gamma=0.0):
    terms = (SADR(gamma, LAYER + 1),) if gamma else ()
    batches = [build_rewrite_batch(tok, r, TEMPLATES, "cpu") for r in REQUESTS]
    return optimise_zs(
        model,
        adapter_for(model).path("mlp_out", LAYER),
        batches,
        cfg,
        terms,
        want_attn=bool(terms),
        first_edited_block=LAYER,
        pad_id=tok.pad_token_id or 0,
    )


def _assert_same(together, separately):
    assert len(together) == len(separately)
    for a, b in zip(together, separately, strict=True):
        assert a.steps_run == b.steps_run
        torch.testing.assert_close(a.v_init, b.v_init, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.delta, b.delta, rtol=1e-4, atol=1e-5)
        assert a.losses == pytest.approx(b.losses, rel=1e-4, abs=1e-5)


def test_batched_z_equals_one_at_a_time(tiny):
    model, tok = tiny
    cfg = ZConfig(steps=6, early_stop_loss=0.0, z_batch=3)
    separately = _separately(model, tok, cfg)
    assert len({round(z.losses[-1], 4) for z in separately}) == 3  # three different problems
    _assert_same(_together(model, tok, cfg), separately)


def _stop_step(losses: list[float], threshold: float) -> int:
    return next((i + 1 for i, value in enumerate(losses) if value < threshold), len(losses))


def test_each_request_stops_early_on_its_own_loss():
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    free_cfg = ZConfig(steps=6, weight_decay=0.0, clamp_norm_factor=1e3, early_stop_loss=0.0)
    free = [z.losses for z in _separately(model, tok, free_cfg)]
    values = sorted({v for losses in free for v in losses})
    # a threshold at which one request stops after some updates while another never stops
    threshold = next(
        t
        for t in ((a + b) / 2 for a, b in zip(values, values[1:], strict=False))
        if any(1 < _stop_step(f, t) < 6 for f in free) and any(min(f) >= t for f in free)
    )
    cfg = dataclasses.replace(free_cfg, early_stop_loss=threshold, z_batch=3)
    separately = _separately(model, tok, cfg)
    assert [z.steps_run for z in separately] == [_stop_step(f, threshold) for f in free]
    _assert_same(_together(model, tok, cfg), separately)


@pytest.mark.parametrize("rows", [True, False])
def test_batched_z_with_sadr_keeps_each_request_own_term(rows):
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    cfg = ZConfig(
        steps=5, early_stop_loss=0.0, z_batch=2, attention_rows=rows, weight_decay=0.0, clamp_norm_factor=1e3
    )  # 2 + 1 requests; z free to move so that heads drift
    separately = _separately(model, tok, cfg, gamma=50.0)
    together = _together(model, tok, cfg, gamma=50.0)
    _assert_same(together, separately)
    plain = _separately(model, tok, dataclasses.replace(cfg, z_batch=1))
    assert any(abs(a.losses[-1] - b.losses[-1]) > 1e-3 for a, b in zip(separately, plain, strict=True))


def test_memit_z_batch_writes_the_same_update():
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    deltas = []
    for z_batch in (1, 2):
        hp = MemitHParams(
            layers=(0, 1),
            steps=4,
            z_batch=z_batch,
            context_templates=((3, 1),),
            mom2_update_weight=10.0,
            mom2_n_tokens=64,
            mom2_corpus="model",
        )
        editor = MemitEditor(hp)
        editor.setup(model, tok)
        before = [adapter_for(model).out_weight(model, layer).detach().clone() for layer in (0, 1)]
        undo = UndoLog()
        editor.apply(model, tok, REQUESTS, undo)
        deltas.append(
            [adapter_for(model).out_weight(model, layer).detach() - b for layer, b in zip((0, 1), before, strict=True)]
        )
        undo.restore()
    for a, b in zip(*deltas, strict=True):
        assert a.norm() > 1e-2 * b.norm() > 0 and a.abs().max() > 1e-3  # a real update, not rounding noise
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_merge_layout_and_mismatched_templates():
    from kelight.models.tiny import tiny_model

    _, tok = tiny_model("llama")
    parts = [build_rewrite_batch(tok, r, TEMPLATES, "cpu") for r in REQUESTS[:2]]
    merged = merge_rewrite_batches(parts, pad_id=0)
    assert merged.n_requests == 2 and merged.n_rewrite == 6 and merged.input_ids.shape[0] == 8
    assert merged.request_of_row.tolist() == [0, 0, 0, 1, 1, 1, 0, 1]  # rewriting rows, then essence rows
    assert merged.first_rows.tolist() == [0, 3]
    for r, part in enumerate(parts):  # every row keeps its tokens and positions
        for i in range(part.input_ids.shape[0]):
            row = r * 3 + i if i < 3 else 6 + r
            n = int(part.attention_mask[i].sum())
            assert merged.input_ids[row, :n].tolist() == part.input_ids[i, :n].tolist()
            assert int(merged.subject_pos[row]) == int(part.subject_pos[i])
    other = build_rewrite_batch(tok, REQUESTS[2], TEMPLATES[:2], "cpu")
    with pytest.raises(EditInputError, match="same rewriting/essence/relation prompt counts"):
        merge_rewrite_batches([parts[0], other], pad_id=0)
    with pytest.raises(EditInputError, match="single-request"):
        merge_rewrite_batches([merged, parts[0]], pad_id=0)


def test_z_batch_must_be_positive():
    with pytest.raises(EditInputError, match="z_batch"):
        ZConfig(z_batch=0)


def test_single_regime_with_z_batch_gives_the_same_cases(tmp_path, monkeypatch):
    from kelight.cli.main import run
    from kelight.editors.rome import RomeEditor
    from tests.cli.test_main import ROOT, _case_file

    calls = []
    compute_zs = RomeEditor.compute_zs

    def spy(self, model, tok, requests):
        calls.append(len(requests))
        return compute_zs(self, model, tok, requests)

    monkeypatch.setattr(RomeEditor, "compute_zs", spy)
    rows = {}
    for z_batch in (1, 2):
        out = tmp_path / f"zb{z_batch}"
        run(
            [
                "fit",
                "--config",
                str(ROOT / "configs/smollm2/rome.yaml"),
                "--model.model_name",
                "tiny:llama",
                "--model.editor.layer",
                "1",
                "--model.editor.steps",
                "4",
                "--model.editor.context_templates",
                "[[3, 1]]",
                "--model.editor.mom2_adjustment",
                "false",
                "--model.fluency",
                "false",
                "--model.editor.z_batch",
                str(z_batch),
                "--data.path",
                str(_case_file(tmp_path)),
                "--data.batch_size",
                "2",
                "--trainer.default_root_dir",
                str(out),
            ]
        )
        rows[z_batch] = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert calls == [1, 1, 2]  # z_batch 1: one request per call (inside apply); z_batch 2: both in one call
    assert len(rows[1]) == len(rows[2]) == 2
    for a, b in zip(rows[1], rows[2], strict=True):
        assert a["id"] == b["id"]
        for key, value in a.items():
            if isinstance(value, float) and key != "edit_seconds":
                assert b[key] == pytest.approx(value, rel=1e-3, abs=1e-3), key


@pytest.mark.parametrize("gamma", [0.0, 50.0])
def test_batched_z_with_the_relation_term_equals_one_at_a_time(gamma):
    """Each request's relation rows follow its essence row in the merged batch and weigh on its own loss."""
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    cfg = ZConfig(
        steps=5,
        early_stop_loss=0.0,
        z_batch=3,
        relation_kl_factor=20.0,
        relation_prompts=3,
        weight_decay=0.0,
        clamp_norm_factor=1e3,
    )
    separately = _separately(model, tok, cfg, gamma=gamma)
    _assert_same(_together(model, tok, cfg, gamma=gamma), separately)
    plain = _separately(model, tok, dataclasses.replace(cfg, relation_kl_factor=0.0), gamma=gamma)
    assert any(abs(a.losses[-1] - b.losses[-1]) > 1e-4 for a, b in zip(separately, plain, strict=True))


def test_merged_relation_rows_sit_after_each_request_essence_row():
    from kelight.editors.rewrite import add_relation_rows
    from kelight.models.tiny import tiny_model

    _, tok = tiny_model("llama")
    parts = [add_relation_rows(build_rewrite_batch(tok, r, TEMPLATES, "cpu"), 2, pad_id=0) for r in REQUESTS[:2]]
    merged = merge_rewrite_batches(parts, pad_id=0)
    assert (merged.n_rewrite, merged.n_relation, merged.input_ids.shape[0]) == (6, 4, 12)
    assert merged.request_of_row.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1]  # essence + 2 relations each
    assert torch.equal(merged.essence_pos, torch.cat([p.essence_pos for p in parts]))
    fewer = add_relation_rows(build_rewrite_batch(tok, REQUESTS[2], TEMPLATES, "cpu"), 1, pad_id=0)
    with pytest.raises(EditInputError, match="same rewriting/essence/relation prompt counts"):
        merge_rewrite_batches([parts[0], fewer], pad_id=0)
    with pytest.raises(EditInputError, match="no relation rows in a joint objective"):
        merge_rewrite_batches(parts, pad_id=0, independent=False)
