"""ESH-Vision: entropy prior, router, ACT, hard/soft routing, the model surface and the losses."""

import math

import numpy as np
import pytest
import torch

import esh
from esh.layers.act import AdaptiveComputationTime
from esh.layers.entropy import histogram_entropy, patch_histograms, pool_histograms
from esh.layers.hybrid_block import HybridVisionBlock, gather_sequences, select_tokens
from esh.layers.relative_attention import RelativeMHSA
from esh.layers.router import SpatialSoftEntropyRouter
from esh.layers.vssm import BidirectionalVSSM
from esh.models.esh_vision import ESHVision, ESHVisionBackbone, ESHVisionConfig, ponder_weight_at

TINY = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=4, num_classes=5)


def tiny_model(**kw) -> ESHVision:
    return ESHVision(ESHVisionConfig(**{**TINY, **kw})).eval()


# --- entropy prior and router -------------------------------------------------------------
def test_entropy_prior_is_zero_on_flat_patches_and_near_one_on_noise():
    flat = torch.zeros(1, 3, 32, 32)
    noise = torch.rand(1, 1, 32, 32).expand(1, 3, 32, 32)  # uniform grey levels
    image = torch.cat([flat[..., :16], noise[..., 16:]], dim=-1)  # left half flat, right half noise
    entropy = histogram_entropy(patch_histograms(image, patch=16, bins=8))
    assert entropy.shape == (1, 2, 2)
    assert torch.all(entropy[..., 0] == 0)
    assert torch.all(entropy[..., 1] > 0.9) and torch.all(entropy <= 1)


def test_entropy_prior_ignores_padding_and_pools_to_larger_patches():
    image = torch.rand(2, 3, 20, 12)
    counts = patch_histograms(image, patch=4, bins=16)
    assert counts.shape == (2, 5, 3, 16)
    assert torch.all(counts.sum(-1) == 16)
    pooled = pool_histograms(counts)  # 2x2 groups: the histograms of 8x8 patches
    direct = patch_histograms(image, patch=8, bins=16)
    assert torch.equal(pooled, direct)
    assert direct[:, -1, -1].sum(-1).tolist() == [16, 16]  # a 4x4 corner of real pixels


def test_entropy_prior_does_not_depend_on_input_normalisation():
    image = torch.rand(1, 3, 16, 16)
    a = histogram_entropy(patch_histograms(image, 4))
    b = histogram_entropy(patch_histograms(image * 7.0 - 3.0, 4))
    assert torch.equal(a, b)


def test_router_alpha_in_unit_range_with_gradients():
    router = SpatialSoftEntropyRouter(8)
    x = torch.randn(2, 5, 5, 8) * 50
    entropy = torch.rand(2, 5, 5)
    alpha = router(x, entropy)
    assert alpha.shape == (2, 5, 5)
    assert torch.all((alpha >= 0) & (alpha <= 1))
    alpha.sum().backward()
    assert router.entropy_weight.grad is not None and router.entropy_weight.grad != 0
    assert router.fc1.weight.grad.abs().sum() > 0


def test_router_starts_entropy_steered():
    router = SpatialSoftEntropyRouter(8)
    torch.nn.init.zeros_(router.fc2.weight)
    alpha = router(torch.randn(3, 8), torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(alpha, torch.sigmoid(torch.tensor([-1.0, 0.0, 1.0])))


# --- ACT ----------------------------------------------------------------------------------
def test_act_halting_maths_against_hand_computed_case():
    act = AdaptiveComputationTime(1, max_steps=3, eps=0.01)
    # h = sigmoid(state): token 0 halts after step 1; token 1 after step 2; token 2 runs to the cap
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    with torch.no_grad():
        act.halt.weight.fill_(1.0)
        act.halt.bias.zero_()
    state = torch.tensor([[logit(0.995)], [logit(0.6)], [logit(0.1)]])
    calls = []

    def step2(states, running):
        calls.append(running.tolist())
        if len(calls) == 1:  # step 2 of tokens 1 and 2
            return torch.tensor([[logit(0.7)], [logit(0.2)]])
        return torch.tensor([[logit(0.3)]])  # step 3 of token 2

    out, steps, cost = act(state, step2)
    assert calls == [[1, 2], [2]]
    assert steps.tolist() == [1, 2, 3]
    # token 0: N=1, R=1. token 1: h1=0.6, 0.6+0.7 >= 0.99 -> N=2, R=0.4.
    # token 2: h1=0.1, h2=0.2 (sum 0.3) -> step 3 is the cap -> N=3, R=0.7
    assert torch.allclose(cost, torch.tensor([2.0, 2.4, 3.7]))
    s = state.squeeze(1)
    expected = torch.stack([s[0], 0.6 * s[1] + 0.4 * logit(0.7), 0.1 * s[2] + 0.2 * logit(0.2) + 0.7 * logit(0.3)])
    assert torch.allclose(out.squeeze(1), expected, atol=1e-5)


def test_act_ponder_cost_has_gradient_through_remainder():
    act = AdaptiveComputationTime(4, max_steps=3)
    state = torch.randn(6, 4)
    out, _, cost = act(state, lambda s, r: s * 0.5 + 1)
    cost.sum().backward()
    assert act.halt.weight.grad.abs().sum() > 0


# --- token selection, gather/scatter ------------------------------------------------------
def test_select_tokens_threshold_and_budget():
    alpha = torch.tensor([[[0.1, 0.9], [0.6, 0.4]], [[0.8, 0.7], [0.2, 0.3]]])
    assert select_tokens(alpha, threshold=0.5).tolist() == [
        [[False, True], [True, False]],
        [[True, True], [False, False]],
    ]
    top1 = select_tokens(alpha, attention_fraction=0.25)
    assert top1.tolist() == [[[False, True], [False, False]], [[True, False], [False, False]]]
    assert select_tokens(alpha, attention_fraction=0.0).sum() == 0
    assert select_tokens(alpha, attention_fraction=1.0).all()


def test_gather_sequences_keeps_raster_order_and_pads_at_the_end():
    mask = torch.tensor([[True, False, True, True], [False, True, False, False]])
    index, valid, lengths = gather_sequences(mask)
    assert lengths.tolist() == [3, 1]
    assert index[0].tolist() == [0, 2, 3]
    assert index[1, :1].tolist() == [1] and valid.tolist() == [[True, True, True], [True, False, False]]


def test_attention_on_selected_tokens_equals_masked_dense_attention():
    attn = RelativeMHSA(8, num_heads=2, window_size=3).eval()
    torch.nn.init.normal_(attn.relative_position_bias_table, std=0.5)
    B, H, W = 2, 5, 7  # windows of 3x3 with padding
    x = torch.randn(B, H, W, 8)
    # all tokens through the gather path == the dense path
    index = torch.arange(B * H * W)
    with torch.no_grad():
        dense = attn(x)
        gathered = attn.forward_tokens(x.reshape(-1, 8), index, (B, H, W))
    assert torch.allclose(gathered, dense.reshape(-1, 8), atol=1e-5)
    # a subset: each selected token sees only the selected tokens of its window
    sel = torch.rand(B, H, W) < 0.4
    index = sel.flatten().nonzero().squeeze(1)
    with torch.no_grad():
        got = attn.forward_tokens(x.reshape(-1, 8)[index], index, (B, H, W))
    for m, i in enumerate(index.tolist()):
        b, r, c = i // (H * W), (i % (H * W)) // W, i % W
        same = [
            j
            for j in index.tolist()
            if j // (H * W) == b and (j % (H * W)) // W // 3 == r // 3 and j % W // 3 == c // 3
        ]
        keys = x.reshape(-1, 8)[same]
        qkv = attn.qkv(torch.cat([x.reshape(-1, 8)[i : i + 1], keys])).view(-1, 3, 2, 4)
        q, k, v = qkv[:1, 0], qkv[1:, 1], qkv[1:, 2]
        rel = attn.relative_index(3, 3, x.device)
        pos = lambda j: ((j % (H * W)) // W % 3) * 3 + (j % W) % 3  # noqa: E731
        bias = attn.relative_position_bias_table[rel[pos(i), [pos(j) for j in same]]]  # (n, heads)
        scores = torch.einsum("hd,nhd->hn", q[0], k) / 2.0 + bias.t()
        ref = attn.proj(torch.einsum("hn,nhd->hd", scores.softmax(-1), v).reshape(8))
        assert torch.allclose(got[m], ref, atol=1e-5), m


def test_vssm_with_lengths_equals_each_sequence_alone():
    vssm = BidirectionalVSSM(8, d_state=4, expand=1).eval()
    x = torch.randn(3, 10, 8)
    lengths = torch.tensor([10, 6, 1])
    with torch.no_grad():
        out = vssm(x, lengths=lengths)
        for b, n in enumerate(lengths.tolist()):
            alone = vssm(x[b : b + 1, :n])
            assert torch.allclose(out[b, :n], alone[0], atol=1e-5)


# --- the block and the model: routing -----------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_hard_equals_soft_when_alpha_is_forced(alpha):
    model = tiny_model()
    x = torch.randn(2, 3, 36, 44)
    with torch.no_grad():
        soft = model.set_routing("soft", force_alpha=alpha).forward_with_aux(x)
        hard = model.set_routing("hard", force_alpha=alpha).forward_with_aux(x)
    assert torch.allclose(soft["logits"], hard["logits"], atol=1e-5)
    assert torch.allclose(soft["ponder_cost"], hard["ponder_cost"])


def test_block_exclusive_hard_selection_uses_each_path_once():
    torch.manual_seed(1)
    blk = HybridVisionBlock(8, num_heads=2, window_size=3, max_ponder_steps=0, layer_scale_init_value=1.0).eval()
    x, entropy = torch.randn(2, 5, 6, 8), torch.rand(2, 5, 6)
    blk.set_routing("hard", threshold=0.5, exclusive=True)
    with torch.no_grad():
        out, alpha, _, frac = blk(x, entropy)
        sel = alpha > 0.5
        assert 0 < frac < 1
        h = blk.norm1(x)
        attn = blk.attn.forward_tokens(h.reshape(-1, 8)[sel.flatten()], sel.flatten().nonzero().squeeze(1), (2, 5, 6))
        y = torch.zeros_like(h).reshape(-1, 8)
        y[sel.flatten()] = attn
        for b in range(2):
            rest = (~sel[b]).flatten().nonzero().squeeze(1)
            y.view(2, 30, 8)[b, rest] = blk.ssm(h[b].reshape(1, 30, 8)[:, rest])[0]
        ref = x + y.view_as(x)
        ref = ref + blk.mlp(blk.norm2(ref))
    assert torch.allclose(out, ref, atol=1e-5)


def test_block_hard_selection_keeps_the_blend_on_selected_patches_and_the_full_scan():
    torch.manual_seed(1)
    blk = HybridVisionBlock(8, num_heads=2, window_size=3, max_ponder_steps=0, layer_scale_init_value=1.0).eval()
    x, entropy = torch.randn(2, 5, 6, 8), torch.rand(2, 5, 6)
    blk.set_routing("hard", threshold=0.5)
    with torch.no_grad():
        out, alpha, _, frac = blk(x, entropy)
        sel = (alpha > 0.5).flatten()
        assert 0 < frac < 1
        h = blk.norm1(x)
        s = blk.ssm(h.reshape(2, 30, 8)).reshape(-1, 8)  # the scan over every patch
        attn = blk.attn.forward_tokens(h.reshape(-1, 8)[sel], sel.nonzero().squeeze(1), (2, 5, 6))
        a = alpha.flatten()[sel].unsqueeze(-1)
        y = s.clone()
        y[sel] = a * attn + (1 - a) * s[sel]
        ref = x + y.view_as(x)
        ref = ref + blk.mlp(blk.norm2(ref))
    assert torch.allclose(out, ref, atol=1e-5)
    # all patches selected: exactly the soft blend
    blk.set_routing("hard", attention_fraction=1.0)
    with torch.no_grad():
        hard = blk(x, entropy)[0]
        blk.set_routing("soft")
        soft = blk(x, entropy)[0]
    assert torch.allclose(hard, soft, atol=1e-5)


def test_hard_budget_routes_the_requested_share():
    model = tiny_model()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.set_routing("hard", attention_fraction=0.25)
        model(x)
        stats = model.auxiliary_losses(0)
    # 8x8, 4x4, 2x2, 2x2, 1x1 grids: round(0.25 * n) patches each
    assert stats["attn_fraction"] == pytest.approx((16 / 64 + 4 / 16 + 1 / 4 + 1 / 4 + 0) / 5)


def test_set_routing_rejects_bad_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="routing mode"):
        model.set_routing("sparse")
    with pytest.raises(ValueError, match="attention_fraction"):
        model.set_routing("hard", attention_fraction=1.5)
    with pytest.raises(ValueError, match="hard-routing budget"):
        model.set_routing("soft", attention_fraction=0.5)


# --- the model surface --------------------------------------------------------------------
def test_seed_quick_start_shapes_on_meta():
    with torch.device("meta"):
        model = ESHVisionBackbone(ESHVisionConfig(num_classes=1000))
        out = model(torch.randn(2, 3, 224, 224))
    assert out["features"].shape == (2, 1000)
    assert out["ponder_cost"].shape == ()
    assert len(out["alphas"]) == 24
    assert out["alphas"][0].shape == (2, 56, 56) and out["alphas"][-1].shape == (2, 7, 7)
    assert esh.ESHVisionBackbone is ESHVisionBackbone and esh.ESHVisionConfig is ESHVisionConfig


def test_backbone_and_registered_model_are_the_same_network():
    torch.manual_seed(0)
    a = esh.create_model("esh_vision_nano", num_classes=7).eval()
    b = ESHVisionBackbone(ESHVisionConfig(**{**a.config.__dict__})).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x)["features"], atol=1e-6)
    timm = pytest.importorskip("timm")
    assert type(timm.create_model("esh_vision_nano", num_classes=7)) is ESHVision


def test_forward_with_aux_contract():
    model = tiny_model()
    out = model.forward_with_aux(torch.randn(2, 3, 32, 32))
    assert out["logits"].shape == (2, 5)
    assert out["block_stage"] == [0, 1, 2, 2, 3]
    assert [tuple(a.shape) for a in out["alphas"]] == [(2, 8, 8), (2, 4, 4), (2, 2, 2), (2, 2, 2), (2, 1, 1)]
    assert all(((a >= 0) & (a <= 1)).all() for a in out["alphas"])
    assert out["ponder_cost"].dim() == 0 and out["ponder_cost"] >= 2


@pytest.mark.parametrize("size", [(1, 1), (17, 29), (64, 40)])
def test_any_resolution(size):
    model = tiny_model()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 5)
        model.set_routing("hard", attention_fraction=0.5)
        assert model(torch.randn(1, 3, *size)).shape == (1, 5)


def test_forward_features_head_and_intermediates():
    model = tiny_model()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 128, 2, 2)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 128)
        final, inter = model.forward_intermediates(x)
        assert [tuple(t.shape) for t in inter] == [(2, 16, 10, 10), (2, 32, 5, 5), (2, 64, 3, 3), (2, 128, 2, 2)]
        assert torch.allclose(final, feats, atol=1e-6)
        only = model.forward_intermediates(x, indices=[1], intermediates_only=True, output_fmt="NHWC")
        assert len(only) == 1 and only[0].shape == (2, 5, 5, 32)
    model.reset_classifier(0)
    assert model(x).shape == (2, 128)


def test_bad_input_raises_value_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="3 input channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="batch, 3, height, width"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="non-empty"):
        model(torch.randn(0, 3, 32, 32))
    with pytest.raises(TypeError, match="unexpected arguments"):
        ESHVision(not_a_field=1)


# --- training terms -----------------------------------------------------------------------
def test_ponder_weight_schedule():
    assert ponder_weight_at(0, 0.01, 15000, 5000) == 0.0
    assert ponder_weight_at(14999, 0.01, 15000, 5000) == 0.0
    assert ponder_weight_at(15000, 0.01, 15000, 5000) == 0.0
    assert ponder_weight_at(17500, 0.01, 15000, 5000) == pytest.approx(0.005)
    assert ponder_weight_at(20000, 0.01, 15000, 5000) == pytest.approx(0.01)
    assert ponder_weight_at(10**6, 0.01, 15000, 5000) == pytest.approx(0.01)
    assert ponder_weight_at(100, 0.5, 100, 0) == 0.5


def test_auxiliary_losses_follow_the_last_forward_and_builder_kwargs():
    model = esh.create_model("esh_vision_nano", num_classes=3, ponder_warmup_steps=10, ponder_ramp_steps=10)
    with pytest.raises(RuntimeError, match="forward pass first"):
        model.auxiliary_losses(0)
    model.train()
    out = model.forward_with_aux(torch.randn(2, 3, 56, 56))
    early, late = model.auxiliary_losses(5), model.auxiliary_losses(15)
    assert early["loss_ponder"] == 0
    assert torch.allclose(late["loss_ponder"], 0.5 * model.config.ponder_weight * out["ponder_cost"])
    alphas = torch.cat([a.flatten() for a in out["alphas"]])
    assert late["alpha_mean"] == pytest.approx(float(alphas.detach().mean()), rel=1e-5)
    assert torch.allclose(late["loss_alpha_var"], -model.config.alpha_var_weight * alphas.var(unbiased=False))
    assert 0 <= late["attn_fraction"] <= 1 and late["ponder_cost"] >= 2
    loss = sum(v for k, v in late.items() if k.startswith("loss"))
    loss.backward()
    assert model.stages[0].blocks[0].router.entropy_weight.grad is not None


def test_grad_checkpointing_keeps_outputs_gradients_and_aux_losses():
    torch.manual_seed(0)
    model = tiny_model(drop_path_rate=0.0).train()
    assert ESHVision.default_grad_checkpointing is True
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        logits = model(x)
        aux = model.auxiliary_losses(10**6)
        (logits.square().mean() + aux["loss_ponder"] + aux["loss_alpha_var"]).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))


def test_variant_parameter_counts_on_meta():
    counts = {}
    for name in ("esh_vision_nano", "esh_vision_tiny", "esh_vision_small", "esh_vision_base", "mambavision_nano"):
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in esh.create_model(name).parameters()) / 1e6
    assert 28 < counts["esh_vision_tiny"] < 35
    assert 45 < counts["esh_vision_small"] < 60
    assert 85 < counts["esh_vision_base"] < 105
    assert 0.8 < counts["esh_vision_nano"] / counts["mambavision_nano"] < 1.25
    with torch.device("meta"):
        assert len(list(esh.create_model("esh_vision_small").blocks())) == 24


def test_elastic_compute_benchmark_runs_every_mode():
    from esh.bench.elastic_compute import run

    lines = []
    rows = run(
        "esh_vision_nano", batch=1, size=32, fractions=(1.0, 0.0), threads=None, repeats=1, print_fn=lines.append
    )
    assert [r.mode for r in rows] == [
        "soft",
        "hard, α > 0.5",
        "hard, 100% attention",
        "hard, 0% attention",
        "hard exclusive, 25% attention",
    ]
    assert rows[2].attn_fraction == 1.0 and rows[3].attn_fraction == 0.0 and rows[3].ponder_cost == 2.0
    assert all(r.images_per_s > 0 for r in rows)
    assert "| soft |" in lines[0] and "1.00x" in lines[0]


def test_cli_eval_with_soft_and_hard_routing(tmp_path, capsys):
    from esh.cli import main

    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, images=rng.integers(0, 255, (20, 28, 28), dtype=np.uint8), labels=np.arange(20) % 2)
    ckpt = tmp_path / "w.pth"
    torch.save({"state_dict": esh.create_model("esh_vision_nano", num_classes=2).state_dict()}, ckpt)
    base = ["eval", "--model", "esh_vision_nano", "--checkpoint", str(ckpt), "--num-classes", "2", "--data", str(data)]
    for extra in (
        [],
        ["--routing", "soft"],
        ["--routing", "hard"],
        ["--routing", "hard", "--attention-fraction", "0.25"],
    ):
        assert main(base + extra) == 0
        assert "top-1" in capsys.readouterr().out
    assert main(base + ["--attention-fraction", "0.5"]) == 2
    assert "--routing hard" in capsys.readouterr().err
    assert (
        main(["eval", "--model", "mambavision_nano", "--num-classes", "2", "--data", str(data), "--routing", "hard"])
        == 2
    )
    assert "α routing" in capsys.readouterr().err


@pytest.mark.parametrize("routing", [{"mode": "soft"}, {"mode": "hard", "attention_fraction": 0.25}])
def test_bfloat16_autocast_runs_soft_and_hard_routing(routing):
    torch.manual_seed(0)
    model = esh.create_model("esh_vision_nano").eval().set_routing(**routing)
    x = torch.randn(2, 3, 56, 56)
    with torch.inference_mode():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_act_reads_the_running_tokens_once_per_ponder_step():
    # which tokens still run is the compute ACT saves: read once to start and once between steps
    from host_syncs import HostSyncs

    act = AdaptiveComputationTime(8, max_steps=4, halt_bias=-10.0)  # nobody halts before the last step
    state = torch.randn(6, 8)
    with HostSyncs() as syncs:
        _, steps, _ = act(state, lambda s, running: s + 1)
    assert (steps == 4).all()
    assert syncs.ops == ["nonzero", "index(bool)", "index(bool)"]
    with HostSyncs() as syncs:
        AdaptiveComputationTime(8, max_steps=1)(state, lambda s, running: s + 1)
    assert syncs.ops == []


def test_hard_routing_tells_none_and_all_selected_from_one_read():
    from host_syncs import HostSyncs

    block = HybridVisionBlock(16, num_heads=2, window_size=4, max_ponder_steps=0).eval()
    h = torch.randn(1, 4, 4, 16)
    none, every = torch.zeros(1, 4, 4, dtype=torch.bool), torch.ones(1, 4, 4, dtype=torch.bool)
    for selected, exclusive in ((none, False), (none, True), (every, True)):
        block.exclusive = exclusive
        with torch.no_grad(), HostSyncs() as syncs:
            block._mix_hard(h, selected, torch.rand(1, 4, 4))
        assert syncs.ops == ["nonzero"], (bool(selected.any()), exclusive)
