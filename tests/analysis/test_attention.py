"""Recording and replaying attention weights; the last token's attention rows."""

import pytest
import torch

from kelight.analysis.attention import last_token_rows, record_attention, replace_attention
from kelight.models.adapters import adapter_for


def _batch():
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]])  # (2, 5), second row right-padded
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    return ids, mask


@torch.no_grad()
def test_replaying_recorded_weights_changes_nothing(tiny):
    """Every family: replaying a forward's own weights in every layer gives the same logits."""
    model, _ = tiny
    ids, mask = _batch()
    implementation = model.config._attn_implementation
    with record_attention(model) as records:
        reference = model(input_ids=ids, attention_mask=mask).logits
    weights = {layer: rec[0] for layer, rec in enumerate(records)}
    assert all(len(rec) == 1 and rec[0].shape[-2:] == (5, 5) for rec in records)
    with replace_attention(model, weights):
        replayed = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(replayed, reference, rtol=0, atol=1e-5)
    assert model.config._attn_implementation == implementation  # switched back
    for module in model.modules():
        assert not any(name.startswith("_kelight_attn") for name in vars(module)), "state left on a module"


@torch.no_grad()
def test_replaced_weights_drive_the_attention_output(model_tok):
    """Llama layer 0 with uniform causal weights = o_proj(mean of the value vectors so far), by hand."""
    model, _ = model_tok
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])  # (1, 6)
    attn = adapter_for(model).module(model, "attn", 0)
    n_heads, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    uniform = torch.tril(torch.ones(6, 6)) / torch.arange(1, 7)[:, None]  # (T, T) rows sum to 1
    captured = {}
    handle = attn.register_forward_hook(lambda m, a, kw, out: captured.update(x=kw["hidden_states"], out=out[0]),
                                        with_kwargs=True)
    try:
        with replace_attention(model, {0: uniform.expand(1, n_heads, 6, 6)}):
            model(input_ids=ids)
    finally:
        handle.remove()
    x = captured["x"]  # (1, T, D) normed input of the attention
    d = attn.head_dim
    v = attn.v_proj(x).view(1, 6, n_kv, d).transpose(1, 2).repeat_interleave(n_heads // n_kv, dim=1)  # (1, H, T, d)
    expected = attn.o_proj((uniform @ v).transpose(1, 2).reshape(1, 6, n_heads * d))  # (1, T, D)
    torch.testing.assert_close(captured["out"], expected, rtol=1e-5, atol=1e-6)


def test_replay_on_another_batch_is_refused(model_tok):
    model, _ = model_tok
    with pytest.raises(ValueError, match="do not match"), replace_attention(model, {0: torch.ones(1, 6, 3, 3)}):
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))


def test_last_token_rows_are_each_sequence_last_query(model_tok):
    model, _ = model_tok
    rows = last_token_rows(model, [[1, 2, 3, 4, 5], [6, 7, 8]], pad_id=0)  # (L, P, H, T)
    assert rows.shape == (3, 2, 6, 5)
    torch.testing.assert_close(rows.sum(-1), torch.ones(3, 2, 6))
    assert torch.all(rows[:, 1, :, 3:] == 0)  # padded keys of the shorter sequence
    with record_attention(model) as records:
        model(input_ids=torch.tensor([[6, 7, 8]]))
    torch.testing.assert_close(rows[:, 1, :, :3], torch.stack([r[0][0, :, -1] for r in records]), atol=1e-6, rtol=0)
