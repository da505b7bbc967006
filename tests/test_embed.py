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


def test_embed_cli_writes_files_atomically_and_resumes_from_shards(tmp_path, capsys):
    import numpy as np

    from esh.align.io import load_embeddings
    from esh.cli import main
    from esh.data.datasets import DIGITS_FILE
    from esh.embed.dataset import embed_dataset

    with np.load(DIGITS_FILE) as f:
        np.savez(tmp_path / "d.npz", images=f["images"][:40], labels=f["labels"][:40])
    out = tmp_path / "e.npy"
    assert (
        main(
            [
                "embed",
                "--model",
                "mambavision_nano",
                "--data",
                str(tmp_path / "d.npz"),
                "--out",
                str(out),
                "--batch-size",
                "16",
            ]
        )
        == 0
    )
    full = np.load(out)
    assert full.shape == (40, 256) and "pooling" in capsys.readouterr().out
    # an interrupted run left shard 0 behind: the rerun keeps it and computes the rest
    adapter = get_adapter("mambavision_nano")
    full = np.load(embed_dataset(adapter, str(tmp_path / "d.npz"), tmp_path / "f.npy", progress=False))
    shards = tmp_path / "p.npz.shards"
    shards.mkdir()
    sentinel = {"embedding": np.full((16, 256), 7.0, np.float32), "label": np.zeros(16, np.int64)}
    np.savez(shards / "000000.npz", **sentinel)
    path = embed_dataset(
        adapter, str(tmp_path / "d.npz"), tmp_path / "p.npz", batch_size=8, shard_size=16, progress=False
    )
    merged = np.load(path)
    assert (merged["embedding"][:16] == 7.0).all()
    np.testing.assert_allclose(merged["embedding"][16:], full[16:], rtol=1e-5, atol=1e-5)
    assert not shards.exists()
    # layer-wise parquet that esh align can read
    pq_out = tmp_path / "l.parquet"
    embed_dataset(adapter, str(tmp_path / "d.npz"), pq_out, layers=True, progress=False)
    assert load_embeddings(pq_out).shape == (40, 256)
    assert load_embeddings(pq_out, column="layer_0").shape == (40, 32)


class _OnDevice:
    """Stands for a CUDA tensor: ``.numpy()`` fails as it does there, ``.cpu()`` gives the values."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def detach(self) -> _OnDevice:
        return self

    def cpu(self) -> torch.Tensor:
        return self.t.detach()

    def numpy(self):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")


def test_embed_dataset_moves_device_embeddings_to_the_host(tmp_path):
    import numpy as np

    from esh.data.datasets import DIGITS_FILE
    from esh.embed.dataset import embed_dataset

    with np.load(DIGITS_FILE) as f:
        np.savez(tmp_path / "d.npz", images=f["images"][:6], labels=f["labels"][:6])
    adapter = get_adapter("mambavision_nano")

    class OnDeviceAdapter:
        def preprocessor(self):
            return adapter.preprocessor()

        def embed(self, images):
            return _OnDevice(adapter.embed(images))

        def embed_layers(self, images):
            return [_OnDevice(t) for t in adapter.embed_layers(images)]

    moved = np.load(
        embed_dataset(OnDeviceAdapter(), str(tmp_path / "d.npz"), tmp_path / "e.npz", layers=True, progress=False)
    )
    direct = np.load(embed_dataset(adapter, str(tmp_path / "d.npz"), tmp_path / "f.npz", layers=True, progress=False))
    assert moved["embedding"].shape == (6, 256) and set(moved) == set(direct)
    for key in direct:
        np.testing.assert_array_equal(moved[key], direct[key])
