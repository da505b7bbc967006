"""esh.info: multiply-adds split into matmul/conv, attention and scan, and the ESH LM's parameter
accounting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esh.info import count_model, esh_lm_param_formula, lm_num_parameters, model_info
from esh.models.esh_lm import ESHConfig, ESHModel


class _AttentionAndBmm(nn.Module):
    """One SDPA call on (1, 2, 16, 8) and one batched matmul that is not attention."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3, 5, 7))

    def forward(self, x):
        q = x.new_zeros(1, 2, 16, 8)
        attn = F.scaled_dot_product_attention(q, q, q)
        projected = torch.bmm(x.reshape(3, 4, 5), self.weight)  # a projection, not attention
        return attn.sum() + projected.sum()


def test_attention_is_counted_from_sdpa_calls_and_other_bmm_is_a_matmul():
    info = count_model(_AttentionAndBmm(), (3, 4, 5))
    assert info.macs_attention == 2 * 16 * 16 * (8 + 8)  # q kᵀ and (softmax) v, per head
    assert info.macs_matmul_conv == 3 * 4 * 5 * 7


def test_vim_has_no_attention_and_keeps_its_total():
    info = model_info("vim_tiny")
    assert info.macs_attention == 0
    assert 3.0 < info.total_gflops < 3.2  # the input projection's bmm is counted with the matmuls
    assert info.macs_matmul_conv / 1e9 == pytest.approx(1.28, abs=0.02)


def test_lm_parameter_accounting_lives_in_info_and_matches_the_model():
    config = ESHConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2, n_experts=4, expert_hidden=48)
    with torch.device("meta"):
        model = ESHModel(config)
    assert lm_num_parameters(model) == esh_lm_param_formula(config) == model.num_parameters()


def test_info_builds_for_the_size_asked_and_refuses_sizes_that_are_not(capsys):
    from esh.cli import main
    from esh.info import model_info

    at_512 = model_info("vim_tiny", img_size=512)  # Vim is built for the size (its position embedding)
    assert at_512.format() != model_info("vim_tiny").format()
    assert main(["info", "mambavision_nano", "--img-size", "-3"]) == 2
    assert capsys.readouterr().err.strip() == "esh info: error: img_size must be a positive integer; got -3"
