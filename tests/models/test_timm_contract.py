"""timm's model contract, after timm's own tests/test_models.py, on every esh vision model.

Registry and cfg checks run on every registered vision model (built on the meta device, so
without weights or compute); forward, backward, features and the head surface run on the
smallest variant of each family (and Vim's stride-8 one) at a small input. The native-size
shape checks of the full models are marked slow.
"""

from __future__ import annotations

import argparse
import copy
import math

import pytest
import torch
from torch import nn

import esh
from esh._compat import import_timm
from esh.models import vim

timm = import_timm()
FeatureGetterNet = timm.models._features.FeatureGetterNet

VISION = sorted(n for n in esh.list_models() if n.startswith(("mambavision_", "vim_", "esh_vision_")))
WITHOUT_WEIGHTS = {"mambavision_nano", "esh_vision_nano", "esh_vision_tiny", "esh_vision_small", "esh_vision_base"}
RELEASED = sorted(set(VISION) - WITHOUT_WEIGHTS)
HIERARCHICAL = ("mambavision_", "esh_vision_")  # NCHW feature maps; Vim gives (B, tokens, D)

# name -> (architecture overrides, input size); the smallest of each family
SMALL = {
    "mambavision_nano": ({}, (3, 56, 56)),
    "esh_vision_nano": ({}, (3, 56, 56)),
    "vim_tiny": (dict(img_size=32, depth=4), (3, 32, 32)),
    "vim_tiny_s8": (dict(img_size=32, depth=4), (3, 32, 32)),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _small(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **{**SMALL[name][0], **kwargs}).eval()


def _input(name: str, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *SMALL[name][1], generator=torch.Generator().manual_seed(1))


def _same_weights(dst: nn.Module, src: nn.Module) -> None:
    """Copy src's weights into dst (which may lack src's norm or head)."""
    missing, _ = dst.load_state_dict(src.state_dict(), strict=False)
    assert not missing


# --- the registry and the pretrained cfgs ------------------------------------------------
def test_every_vision_model_is_registered_with_timm():
    assert len(VISION) == 21
    assert set(VISION) <= set(timm.list_models())
    # timm's backward, TorchScript and FX tests pick models whose name matches their cfg
    assert set(VISION) <= set(timm.list_models(name_matches_cfg=True))


@pytest.mark.parametrize("name", VISION)
def test_pretrained_cfg_is_in_timms_registry(name):
    cfg = timm.get_pretrained_cfg(name, allow_unregistered=False)
    assert cfg.architecture == name
    assert len(cfg.input_size) == 3 and len(cfg.mean) == len(cfg.std) == cfg.input_size[0]
    assert cfg.num_classes == 1000 and cfg.first_conv and cfg.classifier
    assert bool(cfg.has_weights) == (name in RELEASED)


def test_released_weights_are_listed_as_pretrained():
    listed = set(timm.list_models(pretrained=True))
    assert set(RELEASED) <= listed
    assert not WITHOUT_WEIGHTS & listed


@pytest.mark.parametrize("name", VISION)
def test_cfg_names_modules_that_exist(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert cfg == timm.get_pretrained_cfg(name).to_dict() and model.default_cfg is cfg
    state = model.state_dict()
    assert f"{cfg['classifier']}.weight" in state and model.get_submodule(cfg["classifier"]) is model.get_classifier()
    first = model.get_submodule(cfg["first_conv"])
    assert f"{cfg['first_conv']}.weight" in state
    assert isinstance(first, nn.Conv2d) and first.in_channels == cfg["input_size"][0]
    assert model.num_classes == cfg["num_classes"] and model.num_features > 0 and model.head_hidden_size > 0


@pytest.mark.parametrize("name", sorted(SMALL))
def test_esh_and_timm_build_the_same_network(name):
    a = _small(name)
    torch.manual_seed(0)
    b = esh.create_model(name, **SMALL[name][0])
    assert type(a) is type(b) and a.pretrained_cfg == b.pretrained_cfg
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_input_size_in_the_cfg_follows_img_size_and_leaves_the_registry_alone():
    model = _small("vim_tiny")
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert timm.get_pretrained_cfg("vim_tiny").input_size == (3, 224, 224)
    with torch.device("meta"):
        assert esh.create_model("esh_vision_tiny", img_size=96).pretrained_cfg["input_size"] == (3, 96, 96)


def test_pretrained_cfg_overlay_reaches_the_model():
    model = _small("vim_tiny", pretrained_cfg_overlay=dict(crop_pct=0.95))
    assert model.pretrained_cfg["crop_pct"] == 0.95


# --- forward, backward, gradient checkpointing --------------------------------------------
@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_gives_logits(name):
    model, x = _small(name), _input(name)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 1000) and not out.isnan().any()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_backward_reaches_every_parameter(name):
    model, x = _small(name, num_classes=42).train(), _input(name)
    out = model(x)
    out.mean().backward()
    assert out.shape == (2, 42) and not out.isnan().any()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", sorted(SMALL))
def test_grad_checkpointing_keeps_outputs_and_gradients(name, monkeypatch):
    model, x = _small(name), _input(name)
    plain = model(x)
    plain.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    model.set_grad_checkpointing()
    ckpt = model(x)
    ckpt.square().mean().backward()
    assert calls, "set_grad_checkpointing() did not checkpoint anything"
    torch.testing.assert_close(ckpt, plain, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


# --- the head: default cfg shapes, reset_classifier, num_classes=0 ------------------------
def _check_default_cfg_shapes(name: str, model: nn.Module, x: torch.Tensor, num_classes_zero: nn.Module) -> None:
    """timm's test_model_default_cfgs: unpooled features of the cfg's pool size (hierarchical
    models) or tokens of num_features (Vim); pre-logits, reset_classifier(0) and (0, '')."""
    cfg = model.pretrained_cfg
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    if name.startswith(HIERARCHICAL):
        assert feats.shape[1] == model.num_features and tuple(feats.shape[2:]) == tuple(cfg["pool_size"])
    else:
        assert feats.ndim == 3 and feats.shape[-1] == model.num_features
    assert pre.shape == (x.shape[0], model.head_hidden_size)
    model.reset_classifier(0)
    assert model.num_classes == 0
    out = model(x)
    assert out.shape == pre.shape
    model.reset_classifier(0, "")
    assert model(x).shape == feats.shape
    assert num_classes_zero(x).shape == feats.shape


@pytest.mark.parametrize("name", sorted(SMALL))
def test_default_cfg_shapes(name):
    model, x = _small(name), _input(name)
    with torch.no_grad():
        _check_default_cfg_shapes(name, model, x, _small(name, num_classes=0, global_pool=""))


@pytest.mark.slow
@pytest.mark.parametrize("name", VISION)
def test_default_cfg_shapes_at_the_native_size(name):
    with torch.device("meta"):
        model = timm.create_model(name).eval()
        x = torch.empty(1, *model.pretrained_cfg["input_size"])
        _check_default_cfg_shapes(name, model, x, timm.create_model(name, num_classes=0, global_pool="").eval())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_reset_classifier_builds_a_new_head(name):
    model, x = _small(name), _input(name)
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.get_classifier().out_features == 7
    assert model(x).shape == (2, 7)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_num_classes_zero_gives_the_pre_logits(name):
    model, x = _small(name), _input(name)
    pooled = _small(name, num_classes=0)
    _same_weights(pooled, model)
    assert isinstance(pooled.get_classifier(), nn.Identity)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(pooled(x), expected)
    assert expected.shape == (2, model.num_features)


# --- features: forward_intermediates, prune_intermediate_layers, features_only -------------
@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_intermediates_follow_feature_info(name):
    model, x = _small(name), _input(name)
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=len(model.feature_info))
        torch.testing.assert_close(final, model.forward_features(x))
    assert len(inter) == len(model.feature_info)
    for c, r, t in zip(info.channels(), info.reduction(), inter):
        assert t.shape[:2] == (2, c) and not t.isnan().any()
        assert t.shape[2] <= math.ceil(x.shape[2] / r) + 1 and t.shape[3] <= math.ceil(x.shape[3] / r) + 1
    model.set_grad_checkpointing()
    final2, _ = model.forward_intermediates(x, indices=len(model.feature_info))
    torch.testing.assert_close(final2, final, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_stop_early_runs_no_block_after_the_last_index(name):
    model, x = _small(name), _input(name)
    stages = [info["module"] for info in model.feature_info]
    ran = set()
    for stage in stages:
        for sub in model.get_submodule(stage).modules():
            sub.register_forward_hook(lambda *_, s=stage: ran.add(s))
    with torch.no_grad():
        _, full = model.forward_intermediates(x, indices=[0, 1])
        assert ran == set(stages)
        ran.clear()
        final, early = model.forward_intermediates(x, indices=[0, 1], stop_early=True)
    assert ran == set(stages[:2])
    for a, b in zip(early, full):
        torch.testing.assert_close(a, b)
    assert final.shape[0] == 2


@pytest.mark.parametrize("name", sorted(SMALL))
def test_prune_intermediate_layers_keeps_the_features(name):
    model, x = _small(name), _input(name)
    pruned = copy.deepcopy(model)
    take = pruned.prune_intermediate_layers([0, 1])
    assert len(pruned.get_submodule(model.feature_info[0]["module"].rsplit(".", 1)[0])) == 2
    assert pruned.num_classes == 0 and isinstance(pruned.get_classifier(), nn.Identity)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        got = pruned.forward_intermediates(x, indices=take, intermediates_only=True)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("feature_cls", [None, "getter"])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_features_only_wrapper_matches_forward_intermediates(name, feature_cls):
    kwargs = {} if feature_cls is None else {"feature_cls": feature_cls}
    model, x = _small(name), _input(name)
    feats = _small(name, features_only=True, **kwargs)
    assert isinstance(feats, FeatureGetterNet)
    cfg = feats.pretrained_cfg
    assert feats.default_cfg is cfg and cfg["architecture"] == name and cfg["input_size"] == SMALL[name][1]
    assert "classifier" not in cfg and "num_classes" not in cfg
    _same_weights(feats.model, model)
    with torch.no_grad():
        maps = feats(x)
        expected = model.forward_intermediates(x, indices=feats.out_indices, intermediates_only=True)
    assert feats.feature_info.channels() == [t.shape[1] for t in maps]
    assert len(maps) == len(expected) >= 3
    for a, b in zip(maps, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_features_only_out_indices_prune_the_network(name):
    feats = _small(name, features_only=True, out_indices=(0, 1))
    blocks = feats.model.get_submodule(feats.model.feature_info[0]["module"].rsplit(".", 1)[0])
    assert len(blocks) == 2 and len(feats(_input(name))) == 2


@pytest.mark.parametrize("feature_cls", ["hook", "list", "fx"])
def test_feature_classes_that_hook_modules_are_refused(feature_cls):
    with pytest.raises(ValueError, match="feature_cls must be 'getter'.*forward_intermediates"):
        _small("mambavision_nano", features_only=True, feature_cls=feature_cls)


# --- Vim at other input sizes ------------------------------------------------------------
def test_vim_cfg_declares_its_fixed_input_size():
    assert timm.get_pretrained_cfg("vim_tiny").fixed_input_size
    fixed, dynamic = _small("vim_tiny"), _small("vim_tiny", dynamic_img_size=True)
    assert timm.models.get_model_input_config(fixed)["fixed_input_size"]
    assert not timm.models.get_model_input_config(dynamic)["fixed_input_size"]
    with pytest.raises(ValueError, match=r"built for inputs \(batch, 3, 32, 32\).*dynamic_img_size=True"):
        fixed(torch.randn(1, 3, 48, 48))


def test_vim_dynamic_img_size_is_bit_identical_at_the_native_size():
    fixed, x = _small("vim_tiny"), _input("vim_tiny")
    dynamic = _small("vim_tiny", dynamic_img_size=True)
    _same_weights(dynamic, fixed)
    with torch.no_grad():
        assert torch.equal(dynamic(x), fixed(x))
        for a, b in zip(dynamic.forward_intermediates(x)[1], fixed.forward_intermediates(x)[1]):
            assert torch.equal(a, b)


def test_vim_at_another_size_equals_the_model_built_for_it(tmp_path):
    dynamic = _small("vim_tiny", dynamic_img_size=True)
    torch.save({"model": dynamic.state_dict(), "args": argparse.Namespace(model="vim_tiny")}, tmp_path / "v.pth")
    built = esh.create_model("vim_tiny", depth=4, img_size=(48, 64), checkpoint_path=str(tmp_path / "v.pth")).eval()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), built(x))
    assert built.token_position == 6 and dynamic.token_position == 2


@pytest.mark.parametrize("size", [(48, 64), (40, 40), (16, 80)])
def test_vim_dynamic_img_size_trains_and_gives_intermediates_at_any_size(size):
    model = _small("vim_tiny", dynamic_img_size=True, num_classes=5).train()
    x = torch.randn(2, 3, *size)
    model(x).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert model.pos_embed.grad.abs().sum() > 0
    grid = (size[0] // 16, size[1] // 16)
    final, inter = model.eval().forward_intermediates(x, indices=[1, 3])
    assert final.shape == (2, grid[0] * grid[1] + 1, 192)
    assert [tuple(t.shape) for t in inter] == [(2, 192, *grid)] * 2
    feats = _small("vim_tiny", dynamic_img_size=True, features_only=True)
    assert [tuple(t.shape) for t in feats(x)] == [(2, 192, *grid)] * 3


def test_vim_dynamic_img_size_needs_one_patch():
    with pytest.raises(ValueError, match="at least one 16x16 patch"):
        _small("vim_tiny", dynamic_img_size=True)(torch.randn(1, 3, 12, 40))


def test_vim_global_pool_is_checked():
    with pytest.raises(ValueError, match="global_pool must be 'token'.*'avg'.*''"):
        _small("vim_tiny", global_pool="max")
    model = _small("vim_tiny")
    with pytest.raises(ValueError, match="global_pool must be"):
        model.reset_classifier(0, "cls")


def test_vim_avg_pool_is_the_token_mean():
    model, x = _small("vim_tiny", global_pool="avg", num_classes=0), _input("vim_tiny")
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_features(x).mean(1))


# --- checkpoints go through esh's loader, before any wrapper -------------------------------
def _official_vim_file(path, model):
    torch.save({"model": model.state_dict(), "epoch": 299, "args": argparse.Namespace(model="vim_tiny")}, path)


def test_features_only_model_gets_the_checkpoint_weights(tmp_path):
    src = _small("vim_tiny")
    _official_vim_file(tmp_path / "t.pth", src)
    feats = esh.create_model(
        "vim_tiny", **SMALL["vim_tiny"][0], checkpoint_path=str(tmp_path / "t.pth"), features_only=True
    )
    assert torch.equal(feats.model.patch_embed.proj.weight, src.patch_embed.proj.weight)
    assert torch.equal(feats.model.pos_embed, src.pos_embed)


def test_timm_pretrained_with_a_cfg_file_loads_through_esh(tmp_path):
    # a "+" (stride-8) file under the stride-16 name: only esh's loader reads the stride from it
    src = _small("vim_tiny_s8")
    _official_vim_file(tmp_path / "plus.pth", src)
    model = timm.create_model(
        "vim_tiny",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "plus.pth")),
        **SMALL["vim_tiny"][0],
    )
    assert model.stride == 8  # read from the file's pos_embed, as with checkpoint_path=
    assert torch.equal(model.head.weight, src.head.weight)


def test_variant_arguments_can_be_overridden_and_the_file_decides_the_stride(tmp_path):
    with torch.device("meta"):
        assert timm.create_model("vim_tiny_s8", stride=16, embed_dim=64).stride == 16
    _official_vim_file(tmp_path / "plain.pth", _small("vim_tiny"))
    model = esh.create_model("vim_tiny_s8", **SMALL["vim_tiny"][0], checkpoint_path=str(tmp_path / "plain.pth"))
    assert model.stride == 16 and model.pos_embed.shape[1] == 5


def test_offline_mambavision_error_names_the_official_training_file(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"nvidia/MambaVision-T-1K.*mambavision_tiny_1k\.pth\.tar"):
        esh.create_model("mambavision_t", pretrained=True, cache_dir=str(tmp_path))


def test_resize_pos_embed_is_timms_resample_around_the_middle_class_token():
    pe = torch.randn(1, 17, 8)
    out = vim.resize_pos_embed(pe, (4, 4), (3, 5))
    assert out.shape == (1, 16, 8)
    torch.testing.assert_close(out[:, 7], pe[:, 8])  # the class entry, moved from 16 // 2 to 15 // 2
    grid = torch.cat([pe[:, :8], pe[:, 9:]], dim=1)
    expected = timm.layers.resample_abs_pos_embed(grid, [3, 5], [4, 4], num_prefix_tokens=0, antialias=False)
    torch.testing.assert_close(torch.cat([out[:, :7], out[:, 8:]], dim=1), expected)
