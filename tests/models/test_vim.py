"""Vision Mamba: configurations, the bidirectional mixer, class token, checkpoints, resizing."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

import esh
from esh.layers import BiMambaMixer
from esh.models import vim
from esh.models._checkpoint import CheckpointError
from esh.ops import selective_scan_reference

OFFICIAL = {  # parameters, state-dict tensors of the released files
    "vim_tiny": (7_148_008, 415),
    "vim_tiny_s8": (7_250_344, 415),
    "vim_small": (25_796_584, 415),
    "vim_small_s8": (26_001_256, 415),
    "vim_base": (97_598_440, 415),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_every_variant_has_the_official_parameter_count(name):
    with torch.device("meta"):
        model = esh.create_model(name)
    assert (sum(p.numel() for p in model.parameters()), len(model.state_dict())) == OFFICIAL[name]


def test_stride_8_models_have_730_tokens_and_the_class_token_in_the_middle():
    with torch.device("meta"):
        plus, plain = esh.create_model("vim_tiny_s8"), esh.create_model("vim_tiny")
    assert plus.pos_embed.shape[1] == 730 and plus.token_position == 364
    assert plain.pos_embed.shape[1] == 197 and plain.token_position == 98


def _direction(mixer, x, z, conv, x_proj, dt_proj, A_log, D, float32_bias=False):
    L = x.shape[-1]
    u = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=conv.kernel_size[0] - 1, groups=x.shape[1])[..., :L])
    dt, B, C = torch.split(x_proj(u.transpose(1, 2)), [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    delta = (dt @ dt_proj.weight.t()).transpose(1, 2)
    return selective_scan_reference(
        u,
        delta,
        -torch.exp(A_log),
        B.transpose(1, 2),
        C.transpose(1, 2),
        D,
        z=z,
        delta_bias=dt_proj.bias.float() if float32_bias else dt_proj.bias,
        delta_softplus=True,
    )


def test_bimamba_v2_runs_both_directions_with_their_own_parameters():
    torch.manual_seed(0)
    m = BiMambaMixer(16, d_state=4).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    h = torch.randn(2, 9, 16, dtype=torch.float64)
    x, z = m.in_proj(h).transpose(1, 2).chunk(2, dim=1)
    fwd = _direction(m, x, z, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D)
    bwd = _direction(m, x.flip(-1), z.flip(-1), m.conv1d_b, m.x_proj_b, m.dt_proj_b, m.A_b_log, m.D_b).flip(-1)
    expected = m.out_proj(((fwd + bwd) / 2).transpose(1, 2))
    torch.testing.assert_close(m(h), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bimamba_gradients_equal_the_two_directions_through_conv1d(dtype):
    # training: one conv over [forward | backward] channels with its own backward, one scan;
    # the reference: each direction through F.conv1d and the reference scan, autograd throughout
    import contextlib

    from esh.ops.selective_scan import use_backend

    torch.manual_seed(0)
    m = BiMambaMixer(16, d_state=4).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    h = torch.randn(2, 9, 16, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 9, 16, dtype=dtype)
    with use_backend("reference") if dtype == torch.float64 else contextlib.nullcontext():
        got = m(h)
    got_grads = torch.autograd.grad(got, [h, *m.parameters()], g)
    x, z = m.in_proj(h).transpose(1, 2).chunk(2, dim=1)
    f32 = {k: getattr(m, k).float() for k in ("A_log", "A_b_log", "D", "D_b")}
    fwd = _direction(m, x, z, m.conv1d, m.x_proj, m.dt_proj, f32["A_log"], f32["D"], float32_bias=True)
    bwd = _direction(
        m, x.flip(-1), z.flip(-1), m.conv1d_b, m.x_proj_b, m.dt_proj_b, f32["A_b_log"], f32["D_b"], float32_bias=True
    ).flip(-1)
    want = m.out_proj(((fwd + bwd) / 2).transpose(1, 2))
    want_grads = torch.autograd.grad(want, [h, *m.parameters()], g)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    for (name, _), a, e in zip([("input", h), *m.named_parameters()], got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, e, **tol, msg=lambda s, name=name: f"{name}: {s}")


def _tiny_vim(**kw):
    torch.manual_seed(0)
    return vim.VisionMamba(img_size=32, patch_size=8, stride=8, depth=2, embed_dim=16, num_classes=5, **kw).eval()


def test_class_token_readout_and_timm_surface():
    model = _tiny_vim()
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 17, 16) and model.token_position == 8
    torch.testing.assert_close(model(x), model.head(tokens[:, 8]))
    assert model.forward_head(tokens, pre_logits=True).shape == (2, 16)
    maps = model.forward_intermediates(x, intermediates_only=True)
    assert len(maps) == 2 and maps[0].shape == (2, 16, 4, 4)
    model.reset_classifier(0)
    assert model(x).shape == (2, 16)


def test_wrong_input_size_says_how_to_build_for_it():
    with pytest.raises(ValueError, match=r"built for inputs \(batch, 3, 32, 32\).*img_size"):
        _tiny_vim()(torch.randn(1, 3, 40, 40))


def _official_file(path, model, ema_scale=None):
    state = model.state_dict()
    ema = {k: v * ema_scale for k, v in state.items()} if ema_scale else state
    torch.save(
        {
            "model": state,
            "model_ema": ema,
            "optimizer": {},
            "epoch": 299,
            "scaler": "none",
            "args": argparse.Namespace(model="vim_tiny_patch16_224_bimambav2", lr=5e-4),
        },
        path,
    )


def test_official_pth_loads_and_the_stride_is_read_from_pos_embed(tmp_path):
    src = esh.create_model("vim_tiny_s8").eval()
    _official_file(tmp_path / "vim_t_midclstok_ft_78p3acc.pth", src, ema_scale=0.5)
    model = esh.create_model("vim_tiny", checkpoint_path=str(tmp_path / "vim_t_midclstok_ft_78p3acc.pth"))
    assert model.stride == 8 and model.pos_embed.shape[1] == 730
    torch.testing.assert_close(model.head.weight, src.head.weight)
    ema = esh.create_model("vim_tiny", checkpoint_path=str(tmp_path / "vim_t_midclstok_ft_78p3acc.pth"), ema=True)
    torch.testing.assert_close(ema.head.weight, src.head.weight * 0.5)


def test_a_224_checkpoint_into_another_resolution_resizes_pos_embed(tmp_path):
    src = esh.create_model("vim_tiny")
    _official_file(tmp_path / "t.pth", src)
    model = esh.create_model("vim_tiny", img_size=256, checkpoint_path=str(tmp_path / "t.pth"))
    assert model.pos_embed.shape[1] == 257 and model.token_position == 128
    torch.testing.assert_close(model.pos_embed[0, 128], src.pos_embed[0, 98])  # the class entry moves, unchanged
    assert model(torch.randn(1, 3, 256, 256)).shape == (1, 1000)


def test_resize_is_identity_on_the_same_grid_and_keeps_a_constant_grid():
    pe = torch.randn(1, 17, 4)
    assert vim.resize_pos_embed(pe, (4, 4), (4, 4)) is pe
    const = torch.ones(1, 17, 4)
    out = vim.resize_pos_embed(const, (4, 4), (6, 6))
    assert out.shape == (1, 37, 4) and torch.allclose(out, torch.ones_like(out), atol=1e-5)


def test_img_size_builds_vim_for_that_size_and_resizes_a_224_checkpoint(tmp_path):
    src = esh.create_model("vim_tiny", depth=2)
    _official_file(tmp_path / "t.pth", src)
    model = esh.create_model("vim_tiny", img_size=64, depth=2, checkpoint_path=str(tmp_path / "t.pth")).eval()
    assert model.stride == 16 and model.grid == (4, 4) and model.pos_embed.shape[1] == 17
    assert model.pretrained_cfg["input_size"] == (3, 64, 64)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    with pytest.raises(ValueError, match=r"built for inputs \(batch, 3, 64, 64\).*img_size"):
        model(torch.randn(1, 3, 224, 224))


def test_a_stride_8_file_at_another_size_builds_the_stride_8_model(tmp_path):
    src = esh.create_model("vim_tiny_s8", depth=2)
    _official_file(tmp_path / "s8.pth", src)
    model = esh.create_model("vim_tiny", img_size=64, depth=2, checkpoint_path=str(tmp_path / "s8.pth"))
    assert model.stride == 8 and model.grid == (7, 7)
    torch.testing.assert_close(model.layers[1].mixer.A_log, src.layers[1].mixer.A_log)


def test_the_checkpoint_file_is_read_once(tmp_path, monkeypatch):
    from esh.models import _builder

    _official_file(tmp_path / "t.pth", esh.create_model("vim_tiny", depth=2))
    reads = []
    real = _builder.read_checkpoint
    monkeypatch.setattr(_builder, "read_checkpoint", lambda path: reads.append(path) or real(path))
    esh.create_model("vim_tiny", depth=2, checkpoint_path=str(tmp_path / "t.pth"))
    assert len(reads) == 1


def test_mismatched_and_ema_less_files_are_clear_errors(tmp_path):
    torch.save({"model": esh.create_model("vim_small").state_dict()}, tmp_path / "s.pth")
    with pytest.raises(CheckpointError, match="does not fit vim_tiny.*shape mismatches"):
        esh.create_model("vim_tiny", checkpoint_path=str(tmp_path / "s.pth"))
    with pytest.raises(CheckpointError, match="no EMA weights"):
        esh.create_model("vim_small", checkpoint_path=str(tmp_path / "s.pth"), ema=True)


def test_pretrained_offline_says_how_to_pass_a_checkpoint(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="hustvl/Vim-tiny-midclstok.*checkpoint_path"):
        esh.create_model("vim_tiny", pretrained=True, cache_dir=str(tmp_path))


@pytest.mark.parametrize("padded", [False, True])
def test_mixer_inference_path_equals_the_training_path(padded):
    # inference writes both directions into one buffer (and may use the C scan kernel);
    # training concatenates and runs the chunked scan with its backward
    from esh.layers.bimamba import BiMambaMixer

    torch.manual_seed(0)
    mixer = BiMambaMixer(32).eval()
    h = torch.randn(3, 19, 32)
    lengths = torch.tensor([19, 7, 12]) if padded else None
    with torch.no_grad():
        fast = mixer(h, lengths=lengths)
    slow = mixer(h.clone().requires_grad_(), lengths=lengths)
    valid = torch.arange(19)[None, :] < (lengths if padded else torch.full((3,), 19))[:, None]
    torch.testing.assert_close(fast[valid], slow.detach()[valid], rtol=1e-5, atol=1e-6)


def test_flops_are_counted_on_the_meta_device():
    from esh.info import model_info

    info = model_info("vim_tiny")  # the meta device: no autocast state, no kernel
    assert 3.0 < info.total_gflops < 3.2  # matmuls + scan, as the benchmark table reports
