"""MambaVision: configurations, the timm surface, resolutions and the official file formats."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import save_file

import esh
from esh.models import mambavision as mv
from esh.models._checkpoint import CheckpointError

# parameters and state-dict entries of the official models
OFFICIAL = {
    "mambavision_t": (31_794_248, 252),
    "mambavision_t2": (35_104_008, 298),
    "mambavision_s": (50_140_584, 285),
    "mambavision_b": (97_685_288, 356),
    "mambavision_l": (227_961_048, 356),
    "mambavision_l2": (241_554_824, 389),
    "mambavision_b_21k": (97_685_288, 356),
    "mambavision_l_21k": (227_961_048, 356),
    "mambavision_l2_512_21k": (241_554_824, 389),
    "mambavision_l3_256_21k": (739_570_472, 601),
    "mambavision_l3_512_21k": (739_570_472, 601),
}
TINY = dict(dim=16, in_dim=8, depths=(1, 1, 3, 2), num_heads=(1, 1, 2, 2), window_size=(8, 8, 4, 2))


def _tiny(**kwargs) -> mv.MambaVision:
    torch.manual_seed(0)
    return mv.MambaVision(**{**TINY, **kwargs}).eval()


def test_every_released_variant_is_registered():
    assert set(esh.list_models("mambavision*")) == set(OFFICIAL) | {"mambavision_nano"}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_every_variant_has_the_official_parameter_count(name):
    with torch.device("meta"):
        model = esh.create_model(name)
    params, entries = OFFICIAL[name]
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == entries
    assert model.pretrained_cfg["architecture"] == name


def test_native_resolutions_and_windows():
    cfg = {name: c.default.to_dict() for name, c in mv.default_cfgs.items()}
    assert cfg["mambavision_l2_512_21k"]["input_size"] == (3, 512, 512)
    assert cfg["mambavision_l3_256_21k"]["input_size"] == (3, 256, 256)
    with torch.device("meta"):
        model = esh.create_model("mambavision_l3_512_21k")
    assert [lvl.window_size for lvl in model.levels][2:] == [32, 16]
    assert cfg["mambavision_s"]["crop_pct"] == 0.93 and cfg["mambavision_t"]["interpolation"] == "bicubic"


def test_block_kinds_mixers_first_then_attention():
    with torch.device("meta"):
        model = esh.create_model("mambavision_t2")  # stage 3 depth 11: 6 mixers + 5 attention
    kinds = [type(b.mixer).__name__ for b in model.levels[2].blocks]
    assert kinds == ["MambaVisionMixer"] * 6 + ["Attention"] * 5


def test_layer_scale_only_on_the_large_models():
    with torch.device("meta"):
        t, b = esh.create_model("mambavision_t"), esh.create_model("mambavision_b")
    assert not any("gamma" in k for k in t.state_dict())
    assert "levels.2.blocks.0.gamma_1" in b.state_dict()


def test_timm_create_model_builds_the_same_network():
    timm = esh._compat.import_timm()
    with torch.device("meta"):
        model = timm.create_model("mambavision_t", num_classes=10)
    assert isinstance(model, mv.MambaVision) and model.head.out_features == 10


def test_forward_shapes_and_timm_surface():
    model = _tiny(num_classes=7)
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 7)
    feats = model.forward_features(x)
    assert feats.shape == (2, 128, 2, 2)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 128)
    inter = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(t.shape) for t in inter] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    final, inter = model.forward_intermediates(x, indices=[1], output_fmt="NHWC")
    assert final.shape == (2, 128, 2, 2) and inter[0].shape == (2, 8, 8, 32)
    model.reset_classifier(0)
    assert model(x).shape == (2, 128)
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]


def test_num_classes_zero_gives_pooled_features():
    with torch.device("meta"):
        model = esh.create_model("mambavision_t", num_classes=0)
    assert isinstance(model.head, torch.nn.Identity) and model.num_features == 640


def test_features_only_returns_the_four_stage_maps():
    model = esh.create_model("mambavision_t", features_only=True, out_indices=(1, 3)).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 160, 8, 8), (1, 640, 2, 2)]


@pytest.mark.parametrize("size", [(64, 64), (72, 72), (40, 96), (17, 33)])
def test_any_resolution_pads_to_the_window_and_crops_back(size):
    model = _tiny()
    with torch.no_grad():
        out = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
    h, w = size
    for i, t in enumerate(out):
        for _ in range(i + 2):
            h, w = -(-h // 2), -(-w // 2)
        assert t.shape[-2:] == (h, w)
        h, w = size


def test_windowing_is_exact_where_the_map_is_one_window():
    # at 64x64 stage 3 is 4x4 = one window: the padding-free path must equal a model whose
    # window covers a larger padded map only through the padding itself
    model = _tiny()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model.levels[2].window_size = 2  # four 2x2 windows: a different model
        assert not torch.allclose(model(x), ref)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = _tiny(drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "x,message",
    [
        (torch.randn(1, 1, 64, 64), "3 input channels, got 1"),
        (torch.randn(3, 64, 64), r"expects images \(batch, 3, height, width\)"),
        (torch.randn(0, 3, 64, 64), "non-empty batch"),
    ],
)
def test_impossible_input_is_a_value_error(x, message):
    with pytest.raises(ValueError, match=message):
        _tiny()(x)


# --- checkpoints ----------------------------------------------------------------------------
def _randomized(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if "running_var" in name:
                b.uniform_(0.5, 1.5, generator=g)
    return model


def test_training_pth_tar_loads_unchanged(tmp_path):
    src = _randomized(esh.create_model("mambavision_t")).eval()
    path = tmp_path / "mambavision_tiny_1k.pth.tar"
    torch.save(
        {
            "epoch": 309,
            "arch": "mamba_vision_T",
            "state_dict": src.state_dict(),
            "optimizer": {"state": {}, "param_groups": []},
            "version": 2,
            "args": argparse.Namespace(model="mamba_vision_T", lr=5e-3, amp_dtype=torch.float16),
            "metric": 82.3,
        },
        path,
    )
    model = esh.create_model("mambavision_t", checkpoint_path=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))


def test_hub_safetensors_directory_with_renamed_layer_scales(tmp_path):
    src = _randomized(_tiny(layer_scale=1e-5))
    state = {}
    for k, v in src.state_dict().items():
        k = k.replace("gamma_1", "g_1").replace("gamma_2", "g_2")
        state[f"model.{k}"] = v.contiguous()
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mambavision", **TINY}))
    model = _tiny(layer_scale=1e-5)
    mv.load_checkpoint(model, tmp_path, "tiny")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))


def test_a_file_for_another_variant_names_the_mismatch(tmp_path):
    torch.save({"state_dict": _tiny(dim=24).state_dict()}, tmp_path / "other.pth.tar")
    with pytest.raises(CheckpointError, match=r"does not fit tiny:.*shape mismatches.*patch_embed"):
        mv.load_checkpoint(_tiny(), tmp_path / "other.pth.tar", "tiny")


def test_the_released_variant_a_state_dict_belongs_to_is_recognised():
    with torch.device("meta"):
        state = esh.create_model("mambavision_s").state_dict()
    assert mv._guess_variant(state) == "mambavision_s"


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "w.pth.tar"
    torch.save({"state_dict": _tiny().state_dict()}, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        mv.load_checkpoint(_tiny(), path, "tiny")
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        mv.load_checkpoint(_tiny(), bad, "tiny")


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_with_foreign_objects_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _tiny().state_dict(), "hook": Payload()}, path)
    with pytest.raises(CheckpointError, match="allow-list"):
        mv.load_checkpoint(_tiny(), path, "tiny")
    assert "must never run" not in capsys.readouterr().out


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        esh.create_model("mambavision_t", checkpoint_path=str(tmp_path / "nope.pth.tar"))


def test_pretrained_offline_says_how_to_pass_a_checkpoint(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        RuntimeError, match=r"checkpoint_path=.*nvidia/MambaVision-T-1K|nvidia/MambaVision-T-1K.*checkpoint_path"
    ):
        esh.create_model("mambavision_t", pretrained=True, cache_dir=str(tmp_path))
