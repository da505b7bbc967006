"""RelativeMHSA's training path: the written-out biased attention against PyTorch's SDPA, and the
packed subset attention's gradients (empty slots included) by finite differences."""

import pytest
import torch
import torch.nn.functional as F

from esh.layers.relative_attention import RelativeMHSA, biased_attention


@pytest.mark.parametrize("per_item_bias", [False, True])
def test_biased_attention_matches_sdpa_in_values_and_gradients(per_item_bias):
    torch.manual_seed(0)
    n, h, L, d = 5, 3, 7, 4
    q, k, v = (torch.randn(n, h, L, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(n if per_item_bias else 1, h, L, L, dtype=torch.float64)
    bias[..., -2:] = float("-inf")  # two masked keys, in every row
    bias.requires_grad_(True)
    g = torch.randn(n, h, L, d, dtype=torch.float64)
    grads = []
    for attend in (biased_attention, F.scaled_dot_product_attention):
        out = attend(q, k, v, bias)
        grads.append((out, *torch.autograd.grad(out, (q, k, v, bias), g)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert grads[0][4][..., -2:].abs().max() == 0  # masked keys: no gradient to their bias


def test_biased_attention_without_bias_gradient_is_sdpa():
    q, k, v = (torch.randn(2, 1, 5, 4) for _ in range(3))
    bias = torch.randn(1, 1, 5, 5)
    assert torch.equal(biased_attention(q, k, v, bias), F.scaled_dot_product_attention(q, k, v, attn_mask=bias))


def test_subset_attention_gradients_by_finite_differences():
    torch.manual_seed(1)
    attn = RelativeMHSA(4, num_heads=2, window_size=3).double().train()
    torch.nn.init.normal_(attn.relative_position_bias_table, std=0.5)
    B, H, W = 2, 4, 5  # 3x3 windows with padding; packed windows of unequal counts (empty slots)
    index = torch.tensor([0, 1, 2, 6, 7, 12, 13, 17, 19, 20, 24, 26, 33, 38, 39])
    x = torch.randn(index.numel(), 4, dtype=torch.float64, requires_grad=True)
    table = attn.relative_position_bias_table

    def f(x, table_value):
        with torch.no_grad():
            table.copy_(table_value)
        return attn.forward_tokens(x, index, (B, H, W))

    # the table's own gradient, through the module's parameter
    out = attn.forward_tokens(x, index, (B, H, W))
    g = torch.randn_like(out)
    (dtable,) = torch.autograd.grad(out, table, g)
    eps, numeric = 1e-6, torch.zeros_like(dtable)
    base = table.detach().clone()
    for i in range(table.numel()):
        bumped = base.clone().view(-1)
        bumped[i] += eps
        plus = (f(x, bumped.view_as(base)) * g).sum()
        bumped[i] -= 2 * eps
        minus = (f(x, bumped.view_as(base)) * g).sum()
        numeric.view(-1)[i] = (plus - minus) / (2 * eps)
    with torch.no_grad():
        table.copy_(base)
    torch.testing.assert_close(dtable, numeric, rtol=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(lambda x: attn.forward_tokens(x, index, (B, H, W)), (x,))


def test_subset_of_all_tokens_equals_dense_attention_in_training():
    torch.manual_seed(2)
    attn = RelativeMHSA(8, num_heads=2, window_size=3).train()
    torch.nn.init.normal_(attn.relative_position_bias_table, std=0.5)
    B, H, W = 2, 5, 7
    x = torch.randn(B, H, W, 8, requires_grad=True)
    g = torch.randn(B, H, W, 8)
    params = [x, *attn.parameters()]
    dense = attn(x)
    want = torch.autograd.grad(dense, params, g)
    packed = attn.forward_tokens(x.reshape(-1, 8), torch.arange(B * H * W), (B, H, W))
    got = torch.autograd.grad(packed, params, g.reshape(-1, 8))
    torch.testing.assert_close(packed, dense.reshape(-1, 8), rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
