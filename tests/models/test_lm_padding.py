"""Padded batches in the LMs: each row of a left- or right-padded batch gives what it gives alone,
in the forward, the prefill and cached decoding; padding reaches neither the SSM state nor the MoE."""

from __future__ import annotations

import pytest
import torch

from esh.layers import SwitchMoE
from esh.models._lm_padding import gather_rows, padding_first, padding_masks
from esh.models.esh_lm import ESHConfig, ESHModel, MambaLM

LENGTHS = (7, 3, 5)
WIDTH = 7


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0, **kw) -> ESHModel:
    torch.manual_seed(seed)
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=2, n_experts=4, expert_hidden=48, layer_scale_init=1.0)
    return ESHModel(ESHConfig(**{**base, **kw})).eval()


def _prompts(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (n,), generator=g) for n in LENGTHS]


def _pad(prompts: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(prompts), WIDTH, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        span = slice(WIDTH - len(p), WIDTH) if side == "left" else slice(0, len(p))
        ids[i, span], mask[i, span] = p, 1
    return ids, mask


@torch.no_grad()
def _assert_each_row_gives_its_own_logits(model, prompts: list[torch.Tensor], side: str) -> None:
    ids, mask = _pad(prompts, side)
    padded = model(ids, attention_mask=mask).logits
    for i, p in enumerate(prompts):
        real = slice(WIDTH - len(p), WIDTH) if side == "left" else slice(0, len(p))
        torch.testing.assert_close(padded[i, real], model(p[None]).logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ssm_type", ["mamba1", "mamba2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_forward_gives_each_rows_own_logits(side, ssm_type):
    _assert_each_row_gives_its_own_logits(_model(ssm_type=ssm_type), _prompts(), side)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_prefill_then_cached_decode_match_each_row_alone(side):
    model = _model(seed=1)
    prompts = _prompts(1)
    ids, mask = _pad(prompts, side)
    nxt = torch.randint(1, 97, (len(prompts), 3), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = model.new_cache()
        model(ids, past_key_values=cache, attention_mask=mask)
        steps = []
        for t in range(nxt.shape[1]):
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], 1)
            steps.append(model(nxt[:, t : t + 1], past_key_values=cache, attention_mask=mask).logits[:, 0])
        for i, p in enumerate(prompts):
            alone = model(torch.cat([p, nxt[i]])[None]).logits[0, len(p) :]
            torch.testing.assert_close(torch.stack([s[i] for s in steps]), alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_generate_gives_each_prompts_own_tokens(side, use_cache):
    model = _model(seed=2)
    prompts = _prompts(2)
    ids, mask = _pad(prompts, side)
    out = model.generate(ids, max_new_tokens=8, attention_mask=mask, use_cache=use_cache)
    for i, p in enumerate(prompts):
        assert torch.equal(out[i, WIDTH:], model.generate(p[None], max_new_tokens=8)[0, len(p) :]), i


def test_a_padded_decode_token_leaves_the_states_unchanged():
    model = _model(seed=3)
    ids = torch.randint(1, 97, (2, 5))
    nxt = torch.randint(1, 97, (2, 2))
    with torch.no_grad():
        cache = model.new_cache()
        model(ids, past_key_values=cache)
        # row 1 gets a padding token first; its next real token must see the prompt only
        mask = torch.tensor([[1] * 5 + [1, 1], [1] * 5 + [0, 1]])
        out = model(nxt, past_key_values=cache, attention_mask=mask).logits
        alone = model(torch.cat([ids[1], nxt[1, 1:]])[None]).logits[0, -1]
    torch.testing.assert_close(out[1, 1], alone, rtol=1e-5, atol=1e-5)


def test_mamba_lm_padded_forward_gives_each_rows_own_logits():
    torch.manual_seed(0)
    model = MambaLM(97, 32, 2).eval()
    for side in ("left", "right"):
        _assert_each_row_gives_its_own_logits(model, _prompts(4), side)


def test_padding_takes_no_moe_capacity_and_no_part_in_its_losses():
    torch.manual_seed(0)
    moe = SwitchMoE(16, 24, n_experts=4, capacity_factor=1.0).eval()
    real = torch.randn(1, 6, 16)
    padded = torch.cat([torch.randn(1, 10, 16) * 50, real], 1)  # loud padding that would win capacity
    token_mask = torch.cat([torch.zeros(1, 10, dtype=torch.bool), torch.ones(1, 6, dtype=torch.bool)], 1)
    out_alone, aux_alone = moe(real)
    out_padded, aux_padded = moe(padded, token_mask)
    torch.testing.assert_close(out_padded[:, 10:], out_alone)
    assert torch.equal(out_padded[:, :10], torch.zeros_like(out_padded[:, :10]))
    for name in ("load_balance_loss", "z_loss", "dropped_fraction", "expert_fraction"):
        torch.testing.assert_close(getattr(aux_padded, name), getattr(aux_alone, name), msg=name)


def test_positions_count_real_tokens_and_padded_queries_see_themselves():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    pads = padding_masks(mask, past=0, seqlen=4, batch=2)
    assert pads.positions.tolist() == [[0, 0, 0, 1], [0, 1, 2, 2]]
    assert pads.token_mask.tolist() == [[False, False, True, True], [True, True, True, False]]
    assert pads.attn_mask[0, 0].tolist() == [
        [True, False, False, False],
        [False, True, False, False],
        [False, False, True, False],
        [False, False, True, True],
    ]
    assert padding_masks(torch.ones(2, 4), past=0, seqlen=4, batch=2) is None  # no padding: the fast path


def test_padding_is_moved_first_with_the_real_tokens_in_order_and_back():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)
    order = padding_first(mask)
    x = torch.arange(12.0).view(3, 4)
    moved = gather_rows(x, order)
    assert moved.tolist() == [[2, 3, 0, 1], [4, 5, 6, 7], [9, 11, 8, 10]]
    assert gather_rows(mask, order).tolist() == [
        [False, False, True, True],
        [False, True, True, True],
        [False, False, True, True],
    ]
    assert torch.equal(gather_rows(moved, order.argsort(1)), x)
    assert padding_first(torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)) is None  # left padding as it is


def test_a_gap_inside_a_row_is_skipped_by_every_path():
    model = _model(seed=6)
    p = torch.randint(1, 97, (1, 6))
    ids = torch.cat([p[:, :3], torch.zeros(1, 2, dtype=torch.long), p[:, 3:]], 1)
    mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        gapped = model(ids, attention_mask=mask).logits[0, mask[0].bool()]
        torch.testing.assert_close(gapped, model(p).logits[0], rtol=1e-5, atol=1e-5)
