"""MEMIT/PMET on tiny models: targets written at the last layer, exact restore, validation."""

import pytest
import torch

from kelight.editors.corpus import CorpusSpec
from kelight.editors.memit import MemitEditor, MemitHParams
from kelight.editors.update import UndoLog
from kelight.editors.zopt import ZConfig
from kelight.types import EditInputError, EditRequest

REQS = [
    EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris", case_id=0),
    EditRequest("Mount Fuji is located in", "Mount Fuji", "Peru", "Japan", case_id=1),
]
CORPUS = CorpusSpec(kind="texts", texts=tuple(f"Some text number {i} about towers and mountains." for i in range(20)))


def _editor(model, tok, pmet=False, layers=(0, 1), weight=1.0):
    hp = MemitHParams(layers=layers, z=ZConfig(steps=5), context_templates=(), mom2_update_weight=weight,
                      mom2_corpus=CORPUS, mom2_n_tokens=500, pmet=pmet)
    editor = MemitEditor(hp)
    editor.setup(model, tok)  # a small in-memory corpus keeps the test fast and offline
    return editor


@pytest.mark.parametrize("pmet", [False, True])
def test_memit_batch_edit_restores_bit_exact(tiny, pmet):
    model, tok = tiny
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    editor = _editor(model, tok, pmet=pmet)
    undo = UndoLog()
    info = editor.apply(model, tok, REQS, undo)
    assert len(info.z) == 2 and len(undo) == 2  # two layers touched
    undo.restore()
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("pmet", [False, True])
def test_single_layer_update_writes_the_target(pmet):
    """With R = [L] and λ → 0 the module output at the subject equals v_init + δ after the edit."""
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    editor = _editor(model, tok, pmet=pmet, layers=(1,), weight=1e-8)
    undo = UndoLog()
    info = editor.apply(model, tok, REQS[:1], undo)
    target = (info.z[0].v_init[0] + info.z[0].delta[0]).double()
    after = editor._current_values(model, tok, REQS[:1])[:, 0]
    torch.testing.assert_close(after, target, rtol=1e-4, atol=1e-4)
    undo.restore()


@pytest.mark.parametrize(("kwargs", "match"), [({"layers": (3, 1)}, "ascending"), ({"layers": ()}, "non-empty"),
                                               ({"mom2_update_weight": 0.0}, "mom2_update_weight")])
def test_hparams_validation(kwargs, match):
    with pytest.raises(EditInputError, match=match):
        MemitHParams(**kwargs)


def test_layer_out_of_range_on_setup():
    from kelight.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    editor = MemitEditor(MemitHParams(layers=(1, 5), context_templates=()))
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        editor.setup(model, tok)
