"""The relation-preserving objectives (KL and leak): their prompts, options, value at z = 0, where their gradient
goes, and that every locate-then-edit editor takes them (with SADR too)."""

from __future__ import annotations

import json

import pytest
import torch

import kelight
from kelight.data.formats import parse_counterfact_mix
from kelight.data.root import default_data_root
from kelight.editors.alphaedit import AlphaEditHParams
from kelight.editors.locate.zopt import ZConfig, _held_terms, _Injector, optimise_z
from kelight.editors.memit import MemitHParams
from kelight.editors.rewrite import add_relation_rows, build_rewrite_batch, merge_rewrite_batches
from kelight.editors.rome import RomeHParams
from kelight.editors.steps import forward_logprobs
from kelight.lm.hooks import edit_output
from kelight.lm.tokens import pad_id
from kelight.methods import MEMIT, ROME, AlphaEdit
from kelight.models.adapters import adapter_for
from kelight.models.tiny import tiny_model
from kelight.objectives.relations import (
    MAX_RELATION_PROMPTS,
    RELATION_TEMPLATES,
    relation_leak_rows,
    relation_prompts,
)
from kelight.types import EditInputError, EditRequest

TEMPLATES = ["{}", "Yes. {}"]
BIRTH = EditRequest("The place of birth of Ada Lovelace is", "Ada Lovelace", "Paris", "London", case_id=7)

# counterfact_mix-like records: the WikiData half (relation prompts, subject aliases, reasoning) and the
# CounterFact half (paraphrases, neighbours, generation prompts), worded as those data sets word them
WIKIDATA = {
    "requested_rewrite": {
        "prompt": "The occupation of Isabel May is",
        "subject": "Isabel May",
        "target_new": "architect",
        "target_true": "actor",
    },
    "rewrite": {"prompts": ["The occupation of Isabel May is"], "targets": ["architect"]},
    "l-relation": {
        "prompts": [
            f"{q} Isabel May is"
            for q in (
                "The name of the country of citizenship of",
                "The place of birth of",
                "The gender of",
                "The name of the alma mater of",
                "The name of the award",
                "The name of the spouse of",
                "The name of the religion which",
                "The name of the employer of",
            )
        ],
        "targets": ["United States", "Los Angeles", "female", "UCLA", "Emmy", "nobody", "none", "CBS"],
    },
    "p-subject_alias": {"prompts": ["The occupation of Isabel Elizabeth May is"], "targets": ["architect"]},
    "p-reasoning": {"prompts": ["The field of work of the occupation of Isabel May is"], "targets": ["architecture"]},
    "o-commonsense": {"prompts": "To boil water", "right": "heat it", "wrong": "freeze it"},
}
COUNTERFACT = {
    "requested_rewrite": {
        "prompt": "Danielle Darrieux, a native",
        "subject": "Danielle Darrieux",
        "target_new": "English",
        "target_true": "French",
        "relation_id": "P103",
    },
    "rewrite": {"prompts": ["Danielle Darrieux, a native"], "targets": ["English"]},
    "p-paraphrase": {
        "prompts": ["The mother tongue of Danielle Darrieux is", "Danielle Darrieux spoke the language"],
        "targets": ["English", "English"],
    },
    "l-neighbor": {
        "prompts": ["Michel Rocard is a native speaker of", "Jean Gabin spoke the language"],
        "targets": ["French", "French"],
    },
    "generation": {
        "prompts": [
            f"Danielle Darrieux {g}"
            for g in ("was born in", "works as a", "is a citizen of", "is known for", "lives in", "is incredible at")
        ]
    },
}


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def _evaluation_prompts(case) -> set[str]:
    return (
        {_norm(p.prompt) for group in case.probes.values() for p in group}
        | {_norm(p.prompt) for group in case.token_probes.values() for p in group}
        | {_norm(p) for p in case.generation_prompts}
    )


@pytest.mark.parametrize("record", [WIKIDATA, COUNTERFACT], ids=["wikidata", "counterfact"])
def test_relation_prompts_never_include_an_evaluation_prompt(record):
    case = parse_counterfact_mix(record, 0)
    prompts = relation_prompts(case.request, MAX_RELATION_PROMPTS)
    assert len(prompts) == MAX_RELATION_PROMPTS and all(case.request.subject in p for p in prompts)
    assert not {_norm(p) for p in prompts} & _evaluation_prompts(case)


def test_relation_prompts_never_include_a_dev_split_prompt():
    """No filled template equals any probe or generation prompt of any case of the counterfact_mix dev split."""
    root = default_data_root()
    path = None if root is None else root / "counterfact_mix" / "dev.json"
    if path is None or not path.exists():
        pytest.skip("the shared counterfact_mix dev split is not here")
    cases = [parse_counterfact_mix(record, i) for i, record in enumerate(json.loads(path.read_text()))]
    every = set().union(*(_evaluation_prompts(case) for case in cases))
    hits = [p for case in cases for p in relation_prompts(case.request, MAX_RELATION_PROMPTS) if _norm(p) in every]
    assert hits == []


def test_the_edited_relation_is_left_out_by_wording():
    prompts = relation_prompts(BIRTH, MAX_RELATION_PROMPTS)
    for born in ("Ada Lovelace was born in the city of", "The birthplace of Ada Lovelace is"):
        assert born not in prompts  # P19 in both frames: "birth" is in the rewrite prompt
    assert prompts[:3] == [
        "The nationality of Ada Lovelace is",
        "Ada Lovelace earns a living as a",
        "Ada Lovelace is fluent in",
    ]  # the list's order, P19 skipped
    citizenship = EditRequest("The name of the country of citizenship of Ada Lovelace is", "Ada Lovelace", "Peru")
    left = {
        t.relation_id
        for t in RELATION_TEMPLATES
        if t.text.replace("{}", "Ada Lovelace") not in relation_prompts(citizenship, MAX_RELATION_PROMPTS)
    }
    assert {"P27", "P17", "P495"} <= left  # citizenship, and the country relations the wording names


def test_the_edited_relation_is_left_out_by_relation_id():
    """A prompt whose wording names no relation ("X, a native") is matched by the request's WikiData id."""
    vague = EditRequest("Ada Lovelace, in", "Ada Lovelace", "Peru")
    with_id = EditRequest("Ada Lovelace, in", "Ada Lovelace", "Peru", relation_id="P131")
    assert "Ada Lovelace is situated in" in relation_prompts(vague, MAX_RELATION_PROMPTS)
    assert "Ada Lovelace is situated in" not in relation_prompts(with_id, MAX_RELATION_PROMPTS)
    case = parse_counterfact_mix(COUNTERFACT, 0)  # "a native" names P103 and P19 by keyword
    texts = relation_prompts(case.request, MAX_RELATION_PROMPTS)
    assert not any(words in t for t in texts for words in ("fluent in", "born in", "birthplace", "language spoken"))


def _naming(templates) -> EditRequest:
    """A request whose rewrite prompt names the relation of every template in ``templates``."""
    return EditRequest(" ".join(t.keywords[0] for t in templates) + " of Ada Lovelace is", "Ada Lovelace", "Paris")


def test_fewer_templates_left_than_asked_are_cycled():
    with pytest.raises(EditInputError, match="every relation template asks for the edited relation"):
        relation_prompts(_naming(RELATION_TEMPLATES), 4)
    nationality = [t.text.replace("{}", "Ada Lovelace") for t in RELATION_TEMPLATES if t.relation_id == "P27"]
    others = _naming([t for t in RELATION_TEMPLATES if t.relation_id != "P27"])
    assert len(nationality) == 2 and relation_prompts(others, 5) == [nationality[i % 2] for i in range(5)]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (
            {"relation_kl_factor": -1.0},
            "expected relation_kl_factor to be a finite number ≥ 0, got -1.0; use 0 to turn",
        ),
        ({"relation_kl_factor": float("nan")}, "expected relation_kl_factor to be a finite number ≥ 0, got nan"),
        ({"relation_kl_factor": "1"}, "expected relation_kl_factor to be a finite number ≥ 0, got '1'"),
        (
            {"relation_kl_factor": 1.0, "relation_prompts": 0},
            r"expected relation_prompts to be an integer from 1 to \d+ .*got 0 \(the term is on",
        ),
        (
            {"relation_prompts": MAX_RELATION_PROMPTS + 1},
            rf"from 0 to {MAX_RELATION_PROMPTS} .*got {MAX_RELATION_PROMPTS + 1}",
        ),
        ({"relation_leak_factor": -0.5}, "expected relation_leak_factor to be a finite number ≥ 0, got -0.5; use 0"),
        ({"relation_leak_factor": float("inf")}, "expected relation_leak_factor to be a finite number ≥ 0, got inf"),
        (
            {"relation_leak_factor": 1.0, "relation_prompts": 0},
            r"from 1 to \d+ .*got 0 \(the term is on: relation_kl_factor or relation_leak_factor > 0",
        ),
        ({"relation_prompts": 2.0}, "expected relation_prompts to be an integer .*got 2.0"),
        ({"relation_prompts": True}, "expected relation_prompts to be an integer .*got True"),
    ],
)
def test_bad_options_are_refused_everywhere(options, match):
    with pytest.raises(EditInputError, match=match):
        ZConfig(**options)
    for cls, hparams, extra in (
        (ROME, RomeHParams, {}),
        (MEMIT, MemitHParams, {"layers": [1, 2]}),
        (AlphaEdit, AlphaEditHParams, {"layers": [1, 2]}),
    ):
        with pytest.raises(EditInputError, match=match):  # the module's options are its editor's hyper-parameters
            cls(model_name="tiny:llama", editor=hparams(**extra, **options))
    model, tok = tiny_model("llama")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(EditInputError, match=match):
        kelight.edit(model, tok, BIRTH, method="rome", layer=1, mom2_adjustment=False, **options)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_zero_prompts_are_fine_while_the_term_is_off():
    assert ZConfig(relation_prompts=0).relation_kl_factor == 0.0


def test_options_reach_the_z_config():
    """The editor's hyper-parameters are the z optimisation's configuration (a LocateHParams is a ZConfig)."""
    z = ROME(model_name="tiny:llama", editor=RomeHParams(relation_kl_factor=2.0, relation_prompts=5)).build_editor().hp
    assert isinstance(z, ZConfig) and (z.relation_kl_factor, z.relation_prompts) == (2.0, 5)
    z = (
        AlphaEdit(model_name="tiny:llama", editor=AlphaEditHParams(layers=[1, 2], relation_kl_factor=0.5))
        .build_editor()
        .hp
    )
    assert isinstance(z, ZConfig) and (z.relation_kl_factor, z.relation_prompts) == (0.5, 8)


def test_relation_rows_follow_the_essence_rows():
    _, tok = tiny_model("llama")
    batch = build_rewrite_batch(tok, BIRTH, TEMPLATES, "cpu")
    rows = add_relation_rows(batch, 3, pad_id=pad_id(tok))
    assert (rows.n_rewrite, rows.n_relation, rows.input_ids.shape[0]) == (2, 3, 6)
    assert torch.equal(rows.input_ids[:3, : batch.input_ids.shape[1]], batch.input_ids)
    assert torch.equal(rows.subject_pos[:3], batch.subject_pos) and torch.equal(rows.query_pos, batch.query_pos)
    for row, text in zip(range(3, 6), relation_prompts(BIRTH, 3), strict=True):
        ids = tok(text)["input_ids"]
        n = int(rows.attention_mask[row].sum())
        assert rows.input_ids[row, :n].tolist() == ids and int(rows.essence_pos[row - 2]) == len(ids) - 1
        assert tok.decode(ids[: int(rows.subject_pos[row]) + 1]).endswith("Ada Lovelace")
    with pytest.raises(EditInputError, match="without relation rows"):
        add_relation_rows(rows, 3, pad_id=0)
    with pytest.raises(EditInputError, match="at most 0 relation prompts"):
        add_relation_rows(build_rewrite_batch(tok, BIRTH, TEMPLATES, "cpu", relation_candidates=0), 3, pad_id=0)


def _optimise(model, tok, factor: float, steps: int = 4, term: str = "relation_kl_factor", **cfg):
    batch = build_rewrite_batch(tok, BIRTH, TEMPLATES, "cpu")
    config = ZConfig(steps=steps, early_stop_loss=0.0, relation_prompts=4, **{term: factor}, **cfg)
    return optimise_z(model, adapter_for(model).path("mlp_out", 1), batch, config, first_edited_block=1)


def test_the_term_is_zero_at_z_zero():
    model, tok = tiny_model("llama")
    batch = add_relation_rows(build_rewrite_batch(tok, BIRTH, TEMPLATES, "cpu"), 4, pad_id=0)
    log_probs = torch.randn(batch.input_ids.shape[0] - batch.n_rewrite, model.config.vocab_size).log_softmax(-1)
    cfg = ZConfig(kl_factor=0.0, relation_kl_factor=1e6)
    assert _held_terms(log_probs, log_probs.clone(), batch, cfg).tolist() == [0.0]  # exactly
    cfg = ZConfig(kl_factor=0.0, relation_leak_factor=1e6)
    assert _held_terms(log_probs, log_probs.clone(), batch, cfg).tolist() == [0.0]
    # in the optimisation: the first loss (δ = 0) is the same at any weight; later ones are not
    plain, huge = _optimise(model, tok, 0.0), _optimise(model, tok, 1e6)
    assert huge.losses[0] == pytest.approx(plain.losses[0], rel=1e-6)
    assert abs(huge.losses[-1] - plain.losses[-1]) > 1e-3


@pytest.mark.parametrize("term", ["relation_kl_factor", "relation_leak_factor"])
def test_the_gradient_reaches_only_z(term):
    """Even on a model whose parameters ask for gradients, no ``.grad`` is written; δ moves with the term."""
    model, tok = tiny_model("llama")
    model.requires_grad_(True)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    plain, held = _optimise(model, tok, 0.0, term=term), _optimise(model, tok, 50.0, term=term)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert not torch.allclose(held.delta, plain.delta, rtol=1e-3, atol=1e-5)  # the term moved z


def test_the_leak_is_the_rise_of_the_new_objects_first_token():
    """max(0, log P_z(t_r) − log P_0(t_r)) per relation prompt: a fall counts 0, every other token not at all."""
    torch.manual_seed(0)
    init = torch.randn(2, 3, 7).log_softmax(-1)
    now = torch.randn(2, 3, 7).log_softmax(-1)
    tokens = torch.tensor([4, 1])
    expected = [[max(0.0, float(now[r, j, tokens[r]] - init[r, j, tokens[r]])) for j in range(3)] for r in range(2)]
    torch.testing.assert_close(relation_leak_rows(now, init, tokens), torch.tensor(expected))
    assert 0 < sum(map(sum, expected)) and any(v == 0 for row in expected for v in row)  # rises and falls drawn
    moved = now.clone()
    moved[:, :, 0] += 5.0  # another token rises: no leak
    assert torch.equal(relation_leak_rows(moved, now, tokens), torch.zeros(2, 3))


def test_the_leak_reads_each_requests_own_first_target_token():
    """``first_target_ids`` of merged requests, and the leak of each weighs only its own relation rows."""
    _, tok = tiny_model("llama")
    other = EditRequest("The place of birth of Alan Turing is", "Alan Turing", "Zagreb", "London", case_id=8)
    singles = [add_relation_rows(build_rewrite_batch(tok, r, TEMPLATES, "cpu"), 2, pad_id(tok)) for r in (BIRTH, other)]
    for single, request in zip(singles, (BIRTH, other), strict=True):
        assert single.first_target_ids.tolist() == tok(" " + request.target_new)["input_ids"][:1]
    merged = merge_rewrite_batches(singles, pad_id(tok))
    assert torch.equal(merged.first_target_ids, torch.cat([b.first_target_ids for b in singles]))
    V = len(tok)
    n_ess = merged.input_ids.shape[0] - merged.n_rewrite - merged.n_relation  # essence rows of both requests
    init = torch.randn(n_ess + merged.n_relation, V).log_softmax(-1)
    now = init.clone()
    rows = init.view(2, -1, V).shape[1]  # each request's essence then relation rows
    now.view(2, rows, V)[1, -1, merged.first_target_ids[1]] += 2.0  # request 1's last relation row leaks
    now.view(2, rows, V)[0, 0, merged.first_target_ids[0]] += 9.0  # request 0's essence row: not a relation row
    cfg = ZConfig(kl_factor=0.0, relation_leak_factor=3.0, relation_prompts=2)
    assert _held_terms(now, init, merged, cfg).tolist() == pytest.approx([0.0, 3.0 * 2.0 / 2])


def test_the_leak_holds_the_new_object_down_on_the_relation_prompts():
    """With z injected on the relation prompts, o_edit's first token rises there without the term and not with it."""
    model, tok = tiny_model("llama")
    batch = add_relation_rows(build_rewrite_batch(tok, BIRTH, TEMPLATES, "cpu"), 4, pad_id(tok))
    _, before, _ = forward_logprobs(model, batch, want_attn=False)

    def leak(mu: float) -> float:
        delta = _optimise(model, tok, mu, steps=20, term="relation_leak_factor", lr=0.05, kl_factor=0.0,
                          weight_decay=0.0, clamp_norm_factor=1e3).delta
        with edit_output(model, adapter_for(model).path("mlp_out", 1), _Injector(delta[None], batch).fn(0)):
            _, after, _ = forward_logprobs(model, batch, want_attn=False)
        return float(relation_leak_rows(after[None, -4:], before[None, -4:], batch.first_target_ids).mean())

    plain, held = leak(0.0), leak(100.0)
    assert plain > 0.01 and held < plain / 10, (plain, held)


@pytest.mark.parametrize("term", ["relation_kl_factor", "relation_leak_factor"])
@pytest.mark.parametrize("method", ["rome", "memit", "pmet", "alphaedit"])
@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_every_locate_then_edit_editor_takes_it(method, gamma, term):
    """Each editor (and SADR with it) writes another update with the term on; restore is bit-exact."""
    model, tok = tiny_model("llama")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    site = {"layer": 1} if method == "rome" else {"layers": [0, 1]}
    common = {
        **site,
        "steps": 4,
        "early_stop_loss": 0.0,
        "context_templates": [[3, 1]],
        "mom2_corpus": "model",
        "mom2_n_tokens": 64,
        "sadr_gamma": gamma,
        "relation_prompts": 4,
        "weight_decay": 0.0,
        "clamp_norm_factor": 1e3,
    }
    if method == "rome":
        common["mom2_adjustment"] = False
    changes = []
    for factor in (0.0, 50.0):
        model, undo = kelight.edit(model, tok, BIRTH, method=method, **{term: factor}, **common)
        changes.append({k: v - weights[k] for k, v in model.state_dict().items() if not torch.equal(v, weights[k])})
        undo.restore()
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert changes[0].keys() == changes[1].keys() and changes[0]
    assert any(not torch.allclose(changes[0][k], changes[1][k], rtol=1e-3, atol=1e-6) for k in changes[0])
