"""UltraEdit: the ridge closed form equals least squares, each turn writes exactly the shift its definition gives,
the running moments follow every feature seen and reset on restore, restore is bit-exact, bad options and
failures leave the model as it was."""

from __future__ import annotations

import pytest
import torch

import kelight.editors.ultraedit as ue
from kelight.editors.lifelong import LifelongStats, pseudo_values
from kelight.editors.rewrite import build_rewrite_batch
from kelight.editors.steps import EditOptimizationError
from kelight.editors.ultraedit import UltraEditHParams, UltraEditor, edit_features, ridge_update
from kelight.editors.undo import UndoLog
from kelight.lm.forward import logits_at
from kelight.lm.hooks import add_at, edit_output
from kelight.models.adapters import adapter_for
from kelight.models.tiny import tiny_model
from kelight.types import EditInputError, EditRequest

REQUESTS = [
    EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome", case_id=0),
    EditRequest("Mount Fuji is in", "Mount Fuji", "Peru", case_id=1),
    EditRequest("Danielle Darrieux speaks", "Danielle Darrieux", "English", case_id=2),
    EditRequest("Lyon is a city in", "Lyon", "Chad", case_id=3),
]
LAYERS = (1, 2)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def _editor(model, tok, warmup=(), **options) -> UltraEditor:
    editor = UltraEditor(UltraEditHParams(**{"layers": LAYERS, "lr": 1e-2, **options}), warmup=warmup)
    editor.setup(model, tok)
    return editor


@pytest.fixture
def recorded(monkeypatch):
    """Every ``edit_features`` result the editor computes, in order."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(edit_features(*args, **kwargs)[0])
        return calls[-1], 1.0

    monkeypatch.setattr(ue, "edit_features", spy)
    return calls


@pytest.mark.parametrize(("n", "d_in"), [(3, 7), (9, 4)])  # the dual (n < d_in) and the primal system
def test_ridge_update_is_the_regularised_least_squares_solution(n, d_in):
    gen = torch.Generator().manual_seed(n)
    keys, values = torch.randn(n, d_in, generator=gen), torch.randn(n, 5, generator=gen)
    ridge = 0.7
    delta = ridge_update(keys, values, ridge)  # (5, d_in)
    # min ‖K Δᵀ − V‖² + λ‖Δ‖² as plain least squares of the stacked system [K; √λ I] Δᵀ = [V; 0]
    stacked = torch.cat([keys.double(), ridge ** 0.5 * torch.eye(d_in, dtype=torch.float64)])
    target = torch.cat([values.double(), torch.zeros(d_in, 5, dtype=torch.float64)])
    brute = torch.linalg.lstsq(stacked, target).solution.T
    torch.testing.assert_close(delta, brute)
    k, v = keys.double(), values.double()
    torch.testing.assert_close(delta, v.T @ k @ torch.linalg.inv(k.T @ k + ridge * torch.eye(d_in, dtype=k.dtype)))


def _expected_shifts(warmup, turns, hp: UltraEditHParams, d_in: int, d_out: int) -> list[dict[int, torch.Tensor]]:
    """Each turn's shifts from their definition: moments of every feature seen (warm-up included; pooled over
    layers or not), pseudo values (diagonal, or whitened by the gradients' covariance), then the ridge
    solution by least squares."""
    seen: dict = {}

    def see(features) -> None:
        for layer, (k, g) in features.items():
            seen.setdefault(None if hp.pool_layers else layer, []).append(torch.cat([k, g], 1).double())

    for features in warmup:
        see(features)
    shifts = []
    for features in turns:
        see(features)
        turn = {}
        for layer, (k, g) in features.items():
            every = torch.cat(seen[None if hp.pool_layers else layer])  # (N, d_in + d_out)
            n = every.shape[0]
            comoment = torch.cov(every[:, d_in:].T) * (n - 1) if hp.whiten else None
            stats = LifelongStats(d_in, n, every.mean(0), every.var(0) * (n - 1), comoment)
            whitener = stats.grad_whitener(hp.whiten_floor) if hp.whiten else None
            assert (whitener is not None) == hp.whiten  # enough features for the covariance
            values = pseudo_values(stats, k, g, hp.lr, whitener)
            stacked = torch.cat([k.double(), hp.ridge ** 0.5 * torch.eye(d_in, dtype=torch.float64)])
            target = torch.cat([values, torch.zeros(d_in, d_out, dtype=torch.float64)])
            turn[layer] = torch.linalg.lstsq(stacked, target).solution.T
        shifts.append(turn)
    return shifts


WARMUP = [EditRequest(f"Town {i} is in", f"Town {i}", "Atlantis", case_id=i) for i in range(8)]  # 72 features/layer


@pytest.mark.parametrize(("pool_layers", "whiten"), [(True, False), (False, False), (True, True), (False, True)])
def test_three_turns_write_the_shifts_their_definition_gives(recorded, pool_layers, whiten):
    model, tok = tiny_model("llama")
    adapter = adapter_for(model)
    editor = _editor(model, tok, pool_layers=pool_layers, ridge=0.5, whiten=whiten, warmup=WARMUP if whiten else ())
    n_warmup = len(recorded)  # warm-up chunks
    undo, written = UndoLog(), []
    for turn in ([REQUESTS[0], REQUESTS[1]], [REQUESTS[2]], [REQUESTS[3]]):
        before = {layer: adapter.out_weight_as_linear(model, layer).detach().double().clone() for layer in LAYERS}
        editor.apply(model, tok, turn, undo)
        written.append({layer: adapter.out_weight_as_linear(model, layer).double() - before[layer] for layer in LAYERS})
        for key, stats in editor.stats.items():  # moments after turns 1, 2, 3 = moments of everything seen
            rows = torch.cat([torch.cat([k, g], 1).double() for f in recorded for layer, (k, g) in f.items()
                              if key is None or layer == key])
            assert stats.count == rows.shape[0]
            torch.testing.assert_close(stats.mean, rows.mean(0))
            torch.testing.assert_close(stats.std(), rows.std(0))
    assert set(editor.stats) == ({None} if pool_layers else set(LAYERS))
    d_out, d_in = adapter.out_weight_as_linear(model, 1).shape
    expected = _expected_shifts(recorded[:n_warmup], recorded[n_warmup:], editor.hp, d_in, d_out)
    for got, want in zip(written, expected, strict=True):
        for layer in LAYERS:  # float32 weights: the write rounds the float64 shift
            torch.testing.assert_close(got[layer], want[layer], atol=1e-6, rtol=1e-4)


def _n_target(tok, request) -> int:
    return len(tok(" " + request.target_new, add_special_tokens=False)["input_ids"])


def test_features_are_taken_at_the_selected_tokens():
    model, tok = tiny_model("llama")
    adapter = adapter_for(model)
    target, loss = edit_features(model, tok, adapter, LAYERS, REQUESTS[:2], "target")
    every, _ = edit_features(model, tok, adapter, LAYERS, REQUESTS[:2], "all")
    n_target = sum(_n_target(tok, r) for r in REQUESTS[:2])  # the positions predicting target tokens
    n_all = sum(len(tok(r.prompt)["input_ids"]) + _n_target(tok, r) - 1 for r in REQUESTS[:2])  # prompt + target[:-1]
    assert target[1][0].shape == (n_target, 96) and target[1][1].shape == (n_target, 48) and loss > 0
    assert every[2][0].shape == (n_all, 96) and every[2][1].shape == (n_all, 48)


def test_the_gradient_feature_is_the_derivative_of_the_summed_target_nll():
    model, tok = tiny_model("llama", dtype=torch.float64)
    adapter = adapter_for(model)
    (keys, grads), = edit_features(model, tok, adapter, [2], REQUESTS[:1], "target")[0].values()
    batch = build_rewrite_batch(tok, REQUESTS[0], ("{}",), "cpu", essence_templates=())
    direction = torch.randn(grads.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def nll(step: torch.Tensor) -> torch.Tensor:  # the summed target NLL with every target position's output moved
        shift = add_at(batch.target_rows, batch.target_cols, step * direction)
        with edit_output(model, adapter.path("mlp_out", 2), shift):
            logits = logits_at(model, batch.input_ids, batch.attention_mask, batch.target_rows, batch.target_cols)
        return -logits.double().log_softmax(-1).gather(1, batch.target_ids[:, None]).sum()

    step = torch.zeros((), dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        (derivative,) = torch.autograd.grad(nll(step), [step])  # d NLL / d step along the direction
    assert (grads @ direction).sum().item() == pytest.approx(derivative.item(), rel=1e-9)
    h = torch.tensor(1e-4, dtype=torch.float64)  # and by central differences (the norms compute in float32)
    assert ((nll(h) - nll(-h)) / (2 * h)).item() == pytest.approx(derivative.item(), rel=1e-3)


def test_restore_is_bit_exact_and_resets_the_moments():
    model, tok = tiny_model("llama")
    snap = _snapshot(model)
    editor, undo = _editor(model, tok), UndoLog()
    editor.apply(model, tok, REQUESTS[:2], undo)
    editor.apply(model, tok, REQUESTS[2:3], undo)
    assert not _unchanged(model, snap) and editor.stats[None].count > 0
    undo.restore()
    assert _unchanged(model, snap) and editor.stats is editor.initial and editor.stats[None].count == 0
    editor.apply(model, tok, REQUESTS[3:], undo)  # after restore ...
    after_restore = _snapshot(model)
    undo.restore()
    fresh = _editor(model, tok)
    fresh.apply(model, tok, REQUESTS[3:], UndoLog())  # ... equals the same edit on a fresh editor
    assert _unchanged(model, after_restore)


def test_warmup_initialises_the_moments_without_editing(recorded):
    model, tok = tiny_model("llama")
    snap = _snapshot(model)
    oslo = {"prompt": "Oslo is in", "subject": "Oslo", "target_new": "Fiji"}  # a dict of the fields works too
    editor = _editor(model, tok, warmup=[REQUESTS[2], oslo])
    assert _unchanged(model, snap)
    rows = torch.cat([torch.cat([k, g], 1).double() for f in recorded for k, g in f.values()])
    assert editor.initial[None].count == rows.shape[0]
    torch.testing.assert_close(editor.initial[None].mean, rows.mean(0))
    undo = UndoLog()
    editor.apply(model, tok, REQUESTS[:1], undo)
    assert editor.stats[None].count > rows.shape[0]
    undo.restore()
    assert editor.stats[None].count == rows.shape[0]  # back to the warm-up's moments, not empty


def test_the_editor_reads_its_warmup_file_itself(tmp_path):
    """Built from its hyper-parameters alone (the registry, EditSession), the editor warms up on warmup_path's
    requests (skip/limit applied) exactly as on the same requests given directly; both at once are refused."""
    import json

    model, tok = tiny_model("llama")
    records = [{"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new, "ground_truth": "Paris",
                "rephrase_prompt": r.prompt, "locality_prompt": "Oslo is in", "locality_ground_truth": "Norway",
                "case_id": i} for i, r in enumerate(REQUESTS)]
    path = tmp_path / "warm.json"
    path.write_text(json.dumps(records))
    from_file = _editor(model, tok, warmup_path=str(path), warmup_skip=1, warmup_limit=2)
    given = _editor(model, tok, warmup=REQUESTS[1:3])
    assert [r.prompt for r in from_file.warmup] == [r.prompt for r in REQUESTS[1:3]]
    torch.testing.assert_close(from_file.initial[None].mean, given.initial[None].mean, rtol=0, atol=0)
    with pytest.raises(EditInputError, match="either as warmup_path .* or as warmup requests, got both"):
        UltraEditor(UltraEditHParams(layers=LAYERS, warmup_path=str(path)), warmup=REQUESTS[:1])


def test_one_turn_lowers_the_target_loss_of_its_requests():
    model, tok = tiny_model("llama")
    editor = _editor(model, tok, lr=0.05, warmup=REQUESTS[2:])
    adapter = adapter_for(model)
    _, before = edit_features(model, tok, adapter, LAYERS, REQUESTS[:2], "target")
    editor.apply(model, tok, REQUESTS[:2], UndoLog())
    _, after = edit_features(model, tok, adapter, LAYERS, REQUESTS[:2], "target")
    assert after < before - 0.05


def test_gpt2_conv1d_weight_is_shifted_in_its_stored_orientation():
    model, tok = tiny_model("gpt2")
    adapter = adapter_for(model)
    stored = adapter.out_weight(model, 2)
    assert stored.shape == (96, 48)  # Conv1D: (d_in, d_out)
    before = stored.detach().clone()
    editor = _editor(model, tok)
    features, _ = edit_features(model, tok, adapter, LAYERS, REQUESTS[:2], "target")
    stats = {None: LifelongStats.empty(96, 48, torch.float64, "cpu", False)}
    stats = editor._updated(stats, features)
    keys, grads = features[2]
    expected = ridge_update(keys, pseudo_values(stats[None], keys, grads, editor.hp.lr), editor.hp.ridge)  # (48, 96)
    editor.apply(model, tok, REQUESTS[:2], UndoLog())
    torch.testing.assert_close((stored.detach() - before).T.double(), expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(("options", "match"), [
    ({"layers": []}, r"expected layers to be a non-empty ascending list of distinct layers, got \[\]"),
    ({"layers": (2, 1)}, "ascending"),
    ({"layers": 2}, "expected layers to be a list of layer indices"),
    ({"lr": 0.0}, "expected lr to be a finite number > 0, got 0.0"),
    ({"ridge": -1.0}, "expected ridge to be a finite number > 0, got -1.0; the ridge term keeps the solve well posed"),
    ({"whiten_floor": float("nan")}, "expected whiten_floor to be a finite number > 0"),
    ({"tokens": "ans"}, r"expected tokens to be one of \['target', 'all'\], got 'ans'"),
    ({"stats_dtype": "float16"}, r"expected stats_dtype to be one of \['float32', 'float64'\], got 'float16'"),
    ({"whiten": "yes"}, "expected whiten to be true or false, got 'yes'"),
    ({"pool_layers": 1}, "expected pool_layers to be true or false, got 1"),
])
def test_bad_options_are_refused(options, match):
    with pytest.raises(EditInputError, match=match):
        UltraEditHParams(**options)


@pytest.mark.parametrize(("warmup", "match"), [
    ("Paris is in", "expected warmup to be a list of edit requests"),
    ([3], "expected each warmup item to be an EditRequest or a dict of its fields, got 3"),
    ([{"prompt": "Oslo is in", "subject": "Oslo"}], r"missing \['target_new'\]"),
])
def test_bad_warmup_requests_are_refused(warmup, match):
    with pytest.raises(EditInputError, match=match):
        UltraEditor(UltraEditHParams(), warmup=warmup)


def test_a_layer_beyond_the_model_is_refused_at_setup():
    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match=r"layer 3 is out of range for this llama model with 3 layers"):
        _editor(model, tok, layers=(1, 3))


def test_conflicting_requests_are_refused_before_any_change():
    model, tok = tiny_model("llama")
    snap, editor = _snapshot(model), _editor(model, tok)
    other = EditRequest(REQUESTS[0].prompt, REQUESTS[0].subject, "Berlin", case_id=9)
    with pytest.raises(EditInputError, match="of one joint edit rewrite the same prompt"):
        editor.apply(model, tok, [REQUESTS[0], other], UndoLog())
    assert _unchanged(model, snap) and editor.stats is editor.initial


@pytest.mark.parametrize("where", ["gradient", "shift", "write"])
def test_a_failure_mid_turn_leaves_weights_and_moments_as_they_were(monkeypatch, where):
    model, tok = tiny_model("llama")
    editor, undo = _editor(model, tok), UndoLog()
    editor.apply(model, tok, REQUESTS[:1], undo)  # an earlier turn stays
    snap, stats = _snapshot(model), editor.stats
    if where == "gradient":
        def bad_features(*args, **kwargs):
            features, loss = edit_features(*args, **kwargs)
            keys, grads = features[2]
            return {**features, 2: (keys, grads.index_fill(0, torch.tensor([0]), float("inf")))}, loss

        monkeypatch.setattr(ue, "edit_features", bad_features)
        error, match = EditOptimizationError, "loss gradient at layer 2's MLP output are not finite"
    elif where == "shift":
        real = ridge_update
        monkeypatch.setattr(ue, "ridge_update", lambda k, v, r: real(k, v, r) * float("nan"))
        error, match = EditOptimizationError, "the shift of layer 1 is not finite"
    else:  # the second write fails after the first one went in
        real_add, calls = UndoLog.add_, []

        def failing_add(self, param, delta, transposed=False):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("disk on fire")
            return real_add(self, param, delta, transposed)

        monkeypatch.setattr(UndoLog, "add_", failing_add)
        error, match = RuntimeError, "disk on fire"
    with pytest.raises(error, match=match):
        editor.apply(model, tok, REQUESTS[1:3], undo)
    monkeypatch.undo()
    assert _unchanged(model, snap) and editor.stats is stats
    undo.restore()
    assert editor.stats is editor.initial
