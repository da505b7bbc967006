from __future__ import annotations

import pytest
import torch
from torch import nn

import esh
from esh.models import registry


class _Tiny(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.num_classes = num_classes
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(x)


@pytest.fixture
def tiny_models():
    @esh.register_model
    def esh_test_tiny(pretrained=False, checkpoint_path=None, **kwargs):
        model = _Tiny(**kwargs)
        if checkpoint_path is not None:
            model.load_state_dict(torch.load(checkpoint_path, weights_only=True))
        return model

    @esh.register_model(timm=True)
    def esh_test_tiny_timm(pretrained=False, checkpoint_path=None, **kwargs):
        return _Tiny(**kwargs)

    yield
    registry._unregister("esh_test_tiny")
    registry._unregister("esh_test_tiny_timm")


def test_create_model_passes_overrides(tiny_models):
    model = esh.create_model("esh_test_tiny", num_classes=3)
    assert model(torch.randn(2, 8)).shape == (2, 3)


def test_create_model_loads_a_checkpoint(tiny_models, tmp_path):
    src = esh.create_model("esh_test_tiny")
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    loaded = esh.create_model("esh_test_tiny", checkpoint_path=str(path))
    torch.testing.assert_close(loaded.fc.weight, src.fc.weight)


def test_list_models_with_wildcards_and_substrings(tiny_models):
    assert {"esh_test_tiny", "esh_test_tiny_timm"} <= set(esh.list_models())
    assert esh.list_models("esh_test_*") == ["esh_test_tiny", "esh_test_tiny_timm"]
    assert esh.list_models("tiny_timm") == ["esh_test_tiny_timm"]
    assert esh.list_models("no_such_family*") == []
    assert esh.is_model("esh_test_tiny") and not esh.is_model("esh_test_huge")


def test_unknown_name_lists_close_matches(tiny_models):
    with pytest.raises(esh.UnknownModelError, match="did you mean esh_test_tiny"):
        esh.create_model("esh_test_tiyn")
    with pytest.raises(ValueError, match="unknown model 'zzz'"):
        esh.create_model("zzz")


def test_registering_a_second_builder_under_a_taken_name_fails(tiny_models):
    with pytest.raises(ValueError, match="already registered"):

        @esh.register_model
        def esh_test_tiny(pretrained=False, checkpoint_path=None, **kwargs):
            return _Tiny()


def test_timm_create_model_builds_esh_models(tiny_models):
    from esh._compat import import_timm

    timm = import_timm()
    model = timm.create_model("esh_test_tiny_timm", num_classes=4)
    assert isinstance(model, _Tiny) and model.num_classes == 4
    assert "esh_test_tiny_timm" in timm.list_models("esh_test_*")
