from __future__ import annotations

import torch

from esh.embed import get_adapter


def test_vim_embeds_its_class_token_and_every_block():
    a = get_adapter("vim_tiny")
    x = torch.randn(2, 3, 224, 224)
    e = a.embed(x)
    assert e.shape == (2, 192) and e.dtype == torch.float32
    feats = a.model.forward_features(x)
    torch.testing.assert_close(e, feats[:, a.model.token_position].float())
    layers = a.embed_layers(x)
    assert len(layers) == 24 and all(t.shape == (2, 192) for t in layers)
    assert "class token" in a.pooling


def test_mambavision_embeds_pooled_features_and_stages():
    a = get_adapter("mambavision_nano")
    x = torch.randn(2, 3, 56, 56)
    assert a.embed(x).shape == (2, 256)
    assert [t.shape[1] for t in a.embed_layers(x)] == [32, 64, 128, 256]


def test_timm_vit_uses_its_cls_token_and_layers():
    a = get_adapter("deit_tiny_patch16_224")
    x = torch.randn(1, 3, 224, 224)
    assert a.embed(x).shape == (1, 192) and a.pooling == "CLS token"
    assert len(a.embed_layers(x)) == 12


def test_preprocessor_is_the_models_evaluation_transform():
    from PIL import Image

    a = get_adapter("vim_tiny")
    img = Image.new("RGB", (300, 260), (120, 30, 200))
    assert a.preprocessor()(img).shape == (3, 224, 224)
