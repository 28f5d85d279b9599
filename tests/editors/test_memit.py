"""MEMIT/PMET on tiny models: targets written at the last layer, exact restore, validation."""

import logging

import pytest
import torch

from kelight.editors.alphaedit import AlphaEditHParams, AlphaEditor
from kelight.editors.memit import MemitEditor, MemitHParams, PmetEditor, PmetHParams, post_norm_preimage
from kelight.editors.stats.corpus import CorpusSpec
from kelight.editors.undo import UndoLog
from kelight.types import EditInputError, EditRequest

REQS = [
    EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris", case_id=0),
    EditRequest("Mount Fuji is located in", "Mount Fuji", "Peru", "Japan", case_id=1),
]
CORPUS = CorpusSpec(kind="texts", texts=tuple(f"Some text number {i} about towers and mountains." for i in range(20)))


def _editor(model, tok, pmet=False, layers=(0, 1), weight=1.0, value_at=None, **solve):
    """MEMIT (PMET with ``pmet``; AlphaEdit with null-space options in ``solve``)."""
    common = dict(layers=layers, steps=5, context_templates=(), mom2_corpus=CORPUS, mom2_n_tokens=500,
                  value_at=value_at)
    if solve:
        editor = AlphaEditor(AlphaEditHParams(**common, **solve))
    else:
        cls, editor_cls = (PmetHParams, PmetEditor) if pmet else (MemitHParams, MemitEditor)
        editor = editor_cls(cls(**common, mom2_update_weight=weight))
    editor.setup(model, tok)  # a small in-memory corpus keeps the test fast and offline
    return editor


@pytest.mark.parametrize("pmet", [False, True])
def test_memit_batch_edit_restores_bit_exact(tiny, pmet):
    model, tok = tiny
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    editor = _editor(model, tok, pmet=pmet)
    undo = UndoLog()
    info = editor.apply(model, tok, REQS, undo)
    assert len(info.steps) == len(info.losses) == 2 and len(undo) == 2  # two layers touched
    undo.restore()
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("arch", "pmet", "value_at", "module"), [
    ("llama", False, None, "block"), ("llama", True, None, "mlp"), ("llama", False, "mlp", "mlp"),
    ("gemma3_text", False, None, "mlp"),  # post-MLP norm: MEMIT's value defaults to the MLP output
    ("gemma3_text", True, None, "mlp"),
])
def test_single_layer_update_writes_the_target(arch, pmet, value_at, module):
    """With R = [L] and λ → 0 the value module's output at the subject equals v_init + δ after the edit."""
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model(arch)
    editor = _editor(model, tok, pmet=pmet, layers=(1,), weight=1e-8, value_at=value_at)
    assert editor.value_at == module
    path = editor.adapter.path("mlp_out", 1) if module == "mlp" else editor.adapter.block_path(1)
    assert editor.target_path() == path
    undo = UndoLog()
    zs = editor.compute_zs(model, tok, REQS[:1])
    info = editor.apply(model, tok, REQS[:1], undo, zs=zs)
    assert info.steps == (zs[0].steps_run,)
    target = (zs[0].v_init[0] + zs[0].delta[0]).double()
    after = editor._current_values(model, tok, REQS[:1])[:, 0]
    torch.testing.assert_close(after, target, rtol=1e-4, atol=1e-4)
    undo.restore()


def _gemma_norm(dim, seed):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    norm = Gemma3RMSNorm(dim, eps=1e-6)
    if seed is not None:  # non-uniform gain (1 + weight)
        torch.nn.init.normal_(norm.weight, std=0.3, generator=torch.Generator().manual_seed(seed))
    return norm


@pytest.mark.parametrize("seed", [None, 1])
def test_post_norm_preimage_turns_the_normalised_output_with_least_change(seed):
    g = torch.Generator().manual_seed(0)
    m, resid = (torch.randn(16, 3, generator=g, dtype=torch.float64) for _ in range(2))
    norm = _gemma_norm(16, seed)
    torch.testing.assert_close(post_norm_preimage(norm, m, torch.zeros_like(m)), torch.zeros_like(m),
                               rtol=0, atol=1e-5)  # nothing to change: no change
    delta = post_norm_preimage(norm, m, resid)
    y, after = norm(m.T.float()).double().T, norm((m + delta).T.float()).double().T
    cos = torch.nn.functional.cosine_similarity(after, y + resid, dim=0)
    if seed is None:  # uniform gain: the new output points exactly along y + resid, at m's nearest point
        torch.testing.assert_close(cos, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-6)
        torch.testing.assert_close((delta * (m + delta)).sum(0), torch.zeros(3, dtype=torch.float64), rtol=0,
                                   atol=1e-8)
    before = torch.nn.functional.cosine_similarity(y, y + resid, dim=0)
    assert (cos > before).all()  # turned towards the target in every case


def test_memit_writes_through_gemmas_post_mlp_norm(caplog):
    """Gemma-3 normalises the MLP output before the residual: with the paper's block-output value the
    edit turns that normalised output to the target (and setup warns that such edits barely take)."""
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("gemma3_text")
    with caplog.at_level(logging.WARNING, logger="kelight.editors.memit"):
        _editor(model, tok, layers=(1,))  # the default value (MLP output): no warning
        assert not caplog.records
        editor = _editor(model, tok, layers=(1,), weight=1e-8, value_at="block")
    assert "value_at='block'" in caplog.text and "Leave value_at unset" in caplog.text
    assert editor.adapter.mlp_post_norm == "post_feedforward_layernorm"
    zs = editor.compute_zs(model, tok, REQS[:1])
    resid = (zs[0].v_init[0] + zs[0].delta[0]).double()[:, None] - editor._current_values(model, tok, REQS[:1])
    y_before = editor._values_at(model, tok, REQS[:1], [editor.adapter.path("mlp_post_norm", 1)])[0]
    undo = UndoLog()
    editor.apply(model, tok, REQS[:1], undo, zs=zs)
    y_after = editor._values_at(model, tok, REQS[:1], [editor.adapter.path("mlp_post_norm", 1)])[0]
    cos = torch.nn.functional.cosine_similarity(y_after, y_before + resid, dim=0)
    assert cos.item() > 0.999  # the old write (resid into the raw MLP output) misses this direction
    undo.restore()


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (MemitHParams, {"layers": (3, 1)}, "ascending"),
        (MemitHParams, {"layers": ()}, "non-empty"),
        (MemitHParams, {"mom2_update_weight": 0.0}, "mom2_update_weight"),
        (MemitHParams, {"mom2_update_weight": float("nan")}, "mom2_update_weight to be a finite number > 0, got nan"),
        (MemitHParams, {"mom2_update_weight": float("inf")}, "mom2_update_weight to be a finite number > 0, got inf"),
        (MemitHParams, {"layers": 1}, r"layers to be a list of layer indices.*\[1\]"),
        (MemitHParams, {"layers": (True, 2)}, "layers to be a list of layer indices"),
        (MemitHParams, {"context_templates": ((5, -2),)}, "pairs of positive integers"),
        (MemitHParams, {"context_templates": ((5,),)}, "pairs of positive integers"),
        (MemitHParams, {"value_at": "attn"}, "value_at 'block', 'mlp' or None"),
        (PmetHParams, {"value_at": "block"}, "use MEMIT"),
        (AlphaEditHParams, {"nullspace_threshold": 0.0}, "nullspace_threshold to be a finite number > 0, got 0.0"),
        (AlphaEditHParams, {"nullspace_threshold": float("nan")}, "nullspace_threshold"),
        (AlphaEditHParams, {"nullspace_l2": 0.0}, "nullspace_l2 to be a finite number > 0"),
    ],
)
def test_hparams_validation(cls, kwargs, match):
    with pytest.raises(EditInputError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("pmet", [False, True])
def test_conflicting_or_missing_requests_refused_before_any_weight_moves(pmet):
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    editor = _editor(model, tok, pmet=pmet)
    berlin = EditRequest(REQS[0].prompt, REQS[0].subject, "Berlin", case_id=2)
    with pytest.raises(EditInputError, match=r"requests 0 and 2 \(cases 0, 2\) .* subject 'Eiffel Tower' to "
                                             r"different targets \('Rome', 'Berlin'\); edit them in turn"):
        editor.apply(model, tok, [*REQS, berlin], UndoLog())
    with pytest.raises(EditInputError, match="expected at least one edit request, got none"):
        editor.apply(model, tok, [], UndoLog())
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_layer_out_of_range_on_setup():
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    editor = MemitEditor(MemitHParams(layers=(1, 5), context_templates=()))
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        editor.setup(model, tok)


def _median_eigenvalue(model, tok) -> float:
    """A threshold that splits every edited layer's key directions (the tiny models' C is small)."""
    mom2 = _editor(model, tok).mom2
    return float(torch.cat([torch.linalg.eigvalsh(c.double()) for c in mom2.values()]).median())


def _weights(editor, model):
    return {layer: editor.adapter.out_weight_as_linear(model, layer).detach().double().clone()
            for layer in editor.hp.layers}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: a transposed Conv1D output matrix
def test_alphaedit_updates_lie_in_the_null_space_and_keep_earlier_edits(arch):
    """Each layer's change Δ satisfies Δ (I − P) = 0; a second edit on the same weights solves with the
    first edit's keys K_p K_pᵀ (``edited_gram``); restore forgets them and is bit-exact."""
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model(arch)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    threshold = _median_eigenvalue(model, tok)
    editor = _editor(model, tok, nullspace_threshold=threshold, nullspace_l2=1.0)
    assert set(editor.projectors) == {0, 1}
    before = _weights(editor, model)
    undo = UndoLog()
    editor.apply(model, tok, REQS[:1], undo)
    first = _weights(editor, model)
    for layer, p in editor.projectors.items():
        assert 0 < torch.linalg.matrix_rank(p) < p.shape[0]  # a proper null space
        delta = first[layer] - before[layer]
        assert float(delta.abs().max()) > 1e-6  # the edit wrote something
        eye = torch.eye(p.shape[0], dtype=torch.float64)
        assert float((delta @ (eye - p)).abs().max()) < 1e-5 * float(delta.abs().max())  # float32 weights
    grams = {layer: g.clone() for layer, g in editor.edited_gram.items()}
    assert set(grams) == {0, 1}
    editor.apply(model, tok, REQS[1:], undo)  # sequential: K_p = the first edit's keys
    for layer, gram in editor.edited_gram.items():
        assert torch.linalg.matrix_rank(gram) == 2 and not torch.equal(gram, grams[layer])
    undo.restore()
    assert editor.edited_gram == {}
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_alphaedit_second_edit_solves_with_the_first_edits_keys():
    """The second update equals nullspace_update with K_p K_pᵀ = the first edit's keys at that layer, and
    the same edit on fresh weights (K_p = 0) differs."""
    from kelight.editors.locate.solve import nullspace_update
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    alpha = 1e-4  # small against the tiny model's key norms, so that K_p K_pᵀ weighs in
    editor = _editor(model, tok, layers=(1,), nullspace_threshold=_median_eigenvalue(model, tok), nullspace_l2=alpha)
    undo = UndoLog()
    editor.apply(model, tok, REQS[:1], undo)
    prior = editor.edited_gram[1].clone()
    zs = editor.compute_zs(model, tok, REQS[1:])
    keys = editor._mean_keys(model, tok, 1, REQS[1:])
    target = torch.stack([z.v_init[0] + z.delta[0] for z in zs], dim=1).double()
    resid = target - editor._current_values(model, tok, REQS[1:])
    w0 = _weights(editor, model)[1]
    editor.apply(model, tok, REQS[1:], undo, zs=zs)
    got = _weights(editor, model)[1] - w0
    expected = nullspace_update(keys, resid, editor.projectors[1], prior, alpha)
    torch.testing.assert_close(got, expected.float().double(), rtol=1e-4, atol=1e-6)
    fresh = nullspace_update(keys, resid, editor.projectors[1], None, alpha)
    assert float((fresh - expected).abs().max()) > 1e-2 * float(expected.abs().max())
    undo.restore()


def test_alphaedit_threshold_below_every_eigenvalue_is_refused_at_setup():
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(EditInputError, match=r"nullspace_threshold=1e-30 leaves no null space at layer 0: every "
                                             r"eigenvalue .* \(the smallest is .*\); raise nullspace_threshold"):
        _editor(model, tok, nullspace_threshold=1e-30)
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
