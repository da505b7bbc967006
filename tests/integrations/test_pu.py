"""The platonic-universe bridge, against the real ``pu`` package (skipped where it is absent)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esh._compat import has_module

if not has_module("pu"):  # pu's own package import may fail for its heavy extras: only look for it
    pytest.skip("platonic-universe not installed (pip install --no-deps platonic-universe)", allow_module_level=True)
esh_pu = pytest.importorskip("esh.integrations.pu")


def _registry():
    return esh_pu.load_pu_module("models.registry")


def test_importing_registers_the_three_aliases_without_underscores():
    adapters = _registry().list_adapters()
    for alias in ("vim", "mambavision", "eshvision"):
        assert alias in adapters and _registry().get_adapter(alias) is esh_pu.EshAdapter
    for alias, sizes in esh_pu.ALIASES.items():  # pu splits parquet columns <alias>_<size>_<mode> on "_"
        assert "_" not in alias and all("_" not in s for s in sizes)


def test_adapter_follows_pus_model_adapter_contract():
    base = esh_pu.load_pu_module("models.base").ModelAdapter
    assert issubclass(esh_pu.EshAdapter, base)
    adapter = esh_pu.EshAdapter("vim_tiny", "tiny", alias="vim")
    assert (adapter.model_name, adapter.size, adapter.alias) == ("vim_tiny", "tiny", "vim")
    with pytest.raises(RuntimeError, match="load"):
        adapter.get_preprocessor(["hsc"])


def _photos(n: int, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, size, dtype=np.float32)
    return [
        ((base[None, :, None] * (i + 1) / n + rng.normal(0, 20, (size, size, 3))) % 255).astype(np.uint8)
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def vim_adapter():
    torch.manual_seed(0)
    adapter = esh_pu.EshAdapter("vim_tiny", "tiny", alias="vim", pretrained=False, device="cpu")
    adapter.load()
    return adapter


def test_a_pu_style_pipeline_embeds_with_vims_own_preprocessing(vim_adapter):
    datasets = pytest.importorskip("datasets")
    from torch.utils.data import DataLoader

    from esh.inference import eval_transform

    photos = _photos(4)
    ds = datasets.Dataset.from_dict({"hsc_image": photos, "desi": [[0.0]] * 4})
    proc = vim_adapter.get_preprocessor(["hsc", "desi"], resize=False, resize_mode="fill")
    ds = ds.map(proc, remove_columns=["hsc_image"]).with_format("torch")
    batch = next(iter(DataLoader(ds, batch_size=4)))
    emb = vim_adapter.embed_for_mode(batch, "hsc")
    assert emb.dtype == torch.float32 and emb.shape == (4, 192)
    # the same as esh's own embedding of the same photos through Vim's eval transform
    from PIL import Image

    t = eval_transform(vim_adapter.model)
    assert vim_adapter.model.pretrained_cfg["crop_pct"] == 0.875
    direct = vim_adapter.embedder.embed(torch.stack([t(Image.fromarray(p)) for p in photos]))
    torch.testing.assert_close(emb, direct, rtol=1e-5, atol=1e-5)


def test_layerwise_embeddings_per_block_and_last_hidden_state(vim_adapter):
    x = torch.randn(2, 3, 224, 224)
    names = vim_adapter.get_layer_names()
    assert vim_adapter.supports_layerwise() and names[0] == "layers.0" and names[-1] == "last_hidden_state"
    assert vim_adapter.get_num_layers() == 25  # 24 Vim-tiny blocks + the final embedding
    out = vim_adapter.embed_all_layers_for_mode({"hsc": x}, "hsc")
    assert list(out) == names and all(v.shape == (2, 192) and v.dtype == torch.float32 for v in out.values())
    torch.testing.assert_close(out["last_hidden_state"], vim_adapter.embed_for_mode({"hsc": x}, "hsc"))


def test_checkpoint_file_takes_its_architecture_from_alias_and_size(tmp_path):
    from esh.models import create_model

    model = create_model("mambavision_nano", num_classes=10)
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    with pytest.raises(ValueError, match="alias and size"):
        esh_pu.EshAdapter(str(path), "nano", alias="mambavision").load()
    with pytest.raises(ValueError, match="esh model name"):
        esh_pu.EshAdapter("no_such_model", "x", alias="vim").load()


def test_bad_images_give_a_clear_error(vim_adapter):
    proc = vim_adapter.get_preprocessor(["hsc"])
    with pytest.raises(ValueError, match="expected an image"):
        proc({"hsc_image": np.zeros((4, 5, 6, 7))})
    with pytest.raises(ValueError, match="no hsc_image"):
        proc({"other": 1})


def test_mknn_equals_pus_own_function():
    pytest.importorskip("sklearn")
    pytest.importorskip("polars")
    from esh.align import mknn

    pu_metrics = esh_pu.load_pu_module("metrics")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 32)).astype(np.float32)
    b = (a @ rng.normal(size=(32, 24)) + rng.normal(size=(300, 24))).astype(np.float32)
    for k in (1, 5, 10):
        assert mknn(a, b, k=k) == pytest.approx(pu_metrics.mknn(a, b, k), abs=1e-12)


def test_16bit_images_are_scaled_not_clipped():
    from PIL import Image

    image = esh_pu._to_pil(Image.fromarray(np.full((4, 4), 100 * 257, np.uint16)), "hsc", ["hsc"], False, "fill")
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (100, 100, 100)  # convert("RGB") clipped to 255


def test_a_device_this_machine_lacks_is_one_line():
    from esh.errors import InputError

    with pytest.raises(InputError, match="banana"):
        esh_pu.EshAdapter("vim_tiny", "tiny", alias="vim", pretrained=False, device="banana")
