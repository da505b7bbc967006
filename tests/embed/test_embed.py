from __future__ import annotations

import numpy as np
import pytest
import torch

from esh.embed import get_adapter
from esh.embed.dataset import ShardsReplaced, embed_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _small(name: str, seed: int = 0, **kwargs):
    """An adapter for ``name`` built for 32-pixel inputs (fast), with seeded weights."""
    from esh.embed import EmbeddingAdapter
    from esh.models import create_model

    torch.manual_seed(seed)
    return EmbeddingAdapter(create_model(name, num_classes=0, img_size=32), name=name, **kwargs)


def _npz(tmp_path, n: int, start: int = 0, name: str = "d.npz") -> str:
    from esh.data.datasets import DIGITS_FILE

    with np.load(DIGITS_FILE) as f:
        np.savez(tmp_path / name, images=f["images"][start : start + n], labels=f["labels"][start : start + n])
    return str(tmp_path / name)


class _Killed(Exception):
    pass


def _killed_after(adapter, batches: int):
    """``adapter`` whose embed raises after ``batches`` calls, like a run killed mid-way."""
    calls = {"n": 0}
    embed = adapter.embed

    def dying(images):
        calls["n"] += 1
        if calls["n"] > batches:
            raise _Killed
        return embed(images)

    adapter.embed = dying
    return adapter


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


def test_embed_cli_writes_files_atomically(tmp_path, capsys):
    import numpy as np

    from esh.cli import main
    from esh.data.datasets import DIGITS_FILE

    with np.load(DIGITS_FILE) as f:
        np.savez(tmp_path / "d.npz", images=f["images"][:12], labels=f["labels"][:12])
    out = tmp_path / "e.npy"
    argv = ["embed", "--model", "mambavision_nano", "--data", str(tmp_path / "d.npz"), "--out", str(out)]
    assert main([*argv, "--batch-size", "16"]) == 0
    full = np.load(out)
    assert full.shape == (12, 256) and "pooling" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "e.npy"]  # no shards, no temp files
    assert main([*argv, "--batch-size", "16"]) == 0
    np.testing.assert_array_equal(np.load(out), full)  # untrained weights are seeded: the same model again


def test_embed_writes_layers_to_parquet_for_align(tmp_path):
    import numpy as np

    from esh.align.io import load_embeddings

    pq_out = tmp_path / "l.parquet"
    embed_dataset(_small("mambavision_nano"), _npz(tmp_path, 6), pq_out, layers=True, progress=False)
    assert load_embeddings(pq_out).shape == (6, 256)
    assert load_embeddings(pq_out, column="layer_0").shape == (6, 32)
    assert np.isfinite(load_embeddings(pq_out)).all()


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


def _run(adapter, data, out, **kwargs):
    return embed_dataset(adapter, data, out, batch_size=4, shard_size=4, progress=False, **kwargs)


def test_rerun_resumes_from_the_shards_of_the_same_run(tmp_path):
    data = _npz(tmp_path, 12)
    clean = np.load(_run(_small("mambavision_nano"), data, tmp_path / "clean.npz"))["embedding"]
    out = tmp_path / "e.npz"
    with pytest.raises(_Killed):
        _run(_killed_after(_small("mambavision_nano"), 2), data, out)
    shards = tmp_path / "e.npz.shards"
    assert sorted(p.name for p in shards.iterdir()) == ["000000.npz", "000001.npz", "fingerprint.json"]
    with np.load(shards / "000000.npz") as f:
        marked = {**f, "embedding": np.full_like(f["embedding"], 7.0)}
    np.savez(shards / "000000.npz", **marked)  # tells a kept shard from a recomputed one
    again = _killed_after(_small("mambavision_nano"), 1)  # only the missing shard is computed
    merged = np.load(_run(again, data, out))["embedding"]
    assert (merged[:4] == 7.0).all()
    np.testing.assert_array_equal(merged[4:], clean[4:])
    assert not shards.exists()


def _interrupted_then_rerun(tmp_path, first, second, data_first, data_second=None, **rerun):
    out = tmp_path / "e.npz"
    with pytest.raises(_Killed):
        _run(_killed_after(first, 2), data_first, out)
    with pytest.warns(ShardsReplaced) as caught:
        merged = np.load(_run(second, data_second or data_first, out, **rerun))
    return merged, str(caught[0].message)


def test_rerun_with_other_weights_starts_over(tmp_path):
    data = _npz(tmp_path, 12)
    expected = np.load(_run(_small("mambavision_nano", seed=1), data, tmp_path / "b.npz"))["embedding"]
    merged, note = _interrupted_then_rerun(
        tmp_path, _small("mambavision_nano", seed=0), _small("mambavision_nano", seed=1), data
    )
    assert "weights" in note and "starting over" in note
    np.testing.assert_array_equal(merged["embedding"], expected)


def test_rerun_from_another_checkpoint_starts_over(tmp_path):
    from esh.models import create_model

    data = _npz(tmp_path, 12)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(create_model("mambavision_nano", num_classes=10).state_dict(), tmp_path / f"w{seed}.pth")
        paths.append(str(tmp_path / f"w{seed}.pth"))
    a, b = (get_adapter("mambavision_nano", checkpoint_path=p) for p in paths)
    expected = np.load(_run(get_adapter("mambavision_nano", checkpoint_path=paths[1]), data, tmp_path / "b.npz"))
    merged, note = _interrupted_then_rerun(tmp_path, a, b, data)
    assert "weights" in note
    np.testing.assert_array_equal(merged["embedding"], expected["embedding"])


def test_rerun_on_other_data_starts_over(tmp_path):
    first = _npz(tmp_path, 12, start=0, name="d.npz")
    other = _npz(tmp_path, 12, start=100, name="other.npz")
    expected = np.load(_run(_small("mambavision_nano"), other, tmp_path / "b.npz"))
    out = tmp_path / "e.npz"
    with pytest.raises(_Killed):
        _run(_killed_after(_small("mambavision_nano"), 2), first, out)
    (tmp_path / "other.npz").replace(tmp_path / "d.npz")  # same --data path, other contents
    with pytest.warns(ShardsReplaced, match="data"):
        merged = np.load(_run(_small("mambavision_nano"), first, out))
    np.testing.assert_array_equal(merged["embedding"], expected["embedding"])
    np.testing.assert_array_equal(merged["label"], expected["label"])


def test_rerun_with_layers_added_starts_over(tmp_path):
    data = _npz(tmp_path, 12)
    merged, note = _interrupted_then_rerun(
        tmp_path, _small("mambavision_nano"), _small("mambavision_nano"), data, layers=True
    )
    assert "layers" in note
    assert [f"layer_{i}" for i in range(4)] == sorted(k for k in merged if k.startswith("layer_"))
    assert all(len(merged[k]) == 12 for k in merged)


def test_shards_without_a_fingerprint_are_not_trusted(tmp_path):
    data = _npz(tmp_path, 8)
    shards = tmp_path / "e.npz.shards"
    shards.mkdir()
    np.savez(shards / "000000.npz", embedding=np.full((4, 256), 7.0, np.float32), label=np.zeros(4, np.int64))
    with pytest.warns(ShardsReplaced, match="no fingerprint"):
        merged = np.load(_run(_small("mambavision_nano"), data, tmp_path / "e.npz"))
    assert not (merged["embedding"] == 7.0).any()


def test_temporary_files_are_cleaned_on_failure_and_at_the_next_start(tmp_path):
    data = _npz(tmp_path, 8)
    dead = 2**22 + 12345  # beyond the default pid_max: no such process
    (tmp_path / f".e.npz.tmp{dead}").write_bytes(b"left by a killed run")
    with pytest.raises(_Killed):
        _run(_killed_after(_small("mambavision_nano"), 1), data, tmp_path / "e.npz")
    shards = tmp_path / "e.npz.shards"
    assert sorted(p.name for p in shards.iterdir()) == ["000000.npz", "fingerprint.json"]
    (shards / f".000001.npz.tmp{dead}").write_bytes(b"half a shard")
    _run(_small("mambavision_nano"), data, tmp_path / "e.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "e.npz"]


def test_unreadable_images_are_left_out_not_replaced(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
    Image.new("RGB", (16, 16), (200, 200, 200)).save(tmp_path / "imgs" / "a" / "gray.png")
    (tmp_path / "imgs" / "a" / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (16, 16), (10, 100, 250)).save(tmp_path / "imgs" / "b" / "blue.png")
    with pytest.warns(UserWarning, match="skipping unreadable image files: 1 of 3"):
        merged = np.load(_run(_small("mambavision_nano"), str(tmp_path / "imgs"), tmp_path / "e.npz"))
    assert merged["label"].tolist() == [0, 1]  # gray (a), blue (b): no duplicate of gray for empty.jpg
    assert not np.allclose(merged["embedding"][0], merged["embedding"][1])


def test_untrained_weights_are_seeded():
    from esh.embed import weights_digest

    assert weights_digest(get_adapter("mambavision_nano").model) == weights_digest(
        get_adapter("mambavision_nano").model
    )


def test_checkpoint_with_a_classifier_loads_without_it(tmp_path):
    from esh.models import create_model

    full = create_model("vim_tiny")  # with its 1000-class head, as released checkpoints have it
    torch.save({"model": full.state_dict()}, tmp_path / "vim.pth")
    a = get_adapter("vim_tiny", checkpoint_path=str(tmp_path / "vim.pth"))
    assert not any(k.startswith("head") for k in a.model.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        expected = full.eval().forward_features(x)[:, full.token_position]
    torch.testing.assert_close(a.embed(x), expected)


def _train_checkpoint(path, arch: str = "vim_tiny"):
    """The fields ``esh train`` writes (esh.train.trainer.Trainer.state), for a 10-class model
    trained at 32 pixels."""
    from esh.models import create_model

    model = create_model(arch, num_classes=10, img_size=32)
    torch.save(
        {
            "arch": arch,
            "model": model.state_dict(),
            "optimizer": {"state": {}, "param_groups": []},
            "ema": None,
            "epoch": 1,
            "num_classes": 10,
            "classes": [str(i) for i in range(10)],
            "config": {"model": arch, "img_size": 32, "model_kwargs": {}, "data": "digits"},
        },
        path,
    )
    return model


def test_esh_train_checkpoint_embeds_at_its_size(tmp_path):
    model = _train_checkpoint(tmp_path / "best.pth")
    a = get_adapter("vim_tiny", checkpoint_path=str(tmp_path / "best.pth"))
    from PIL import Image

    assert a.preprocessor()(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = model.eval().forward_features(x)[:, model.token_position]
    torch.testing.assert_close(a.embed(x), expected)


def test_checkpoint_written_by_esh_train_works_in_esh_embed(tmp_path, capsys):
    from esh.cli import main

    data = _npz(tmp_path, 16)
    argv = ["--model", "mambavision_nano", "--img-size", "32", "--data", data, "--epochs", "1", "--batch-size", "8"]
    assert main(["train", *argv, "--out", str(tmp_path / "run")]) == 0
    out = tmp_path / "e.npz"
    embed = ["embed", "--model", "mambavision_nano", "--data", data, "--out", str(out)]
    assert main([*embed, "--checkpoint", str(tmp_path / "run" / "best.pth")]) == 0
    assert np.load(out)["embedding"].shape == (16, 256)


def test_esh_train_checkpoint_of_another_model_is_refused(tmp_path):
    from esh.errors import InputError

    _train_checkpoint(tmp_path / "best.pth")
    with pytest.raises(InputError, match="holds a vim_tiny"):
        get_adapter("mambavision_nano", checkpoint_path=str(tmp_path / "best.pth"))


@pytest.mark.parametrize(
    "options,message",
    [
        ({"--batch-size": "0"}, "batch size must be a positive integer"),
        ({"--out": "e.txt"}, "--out must end in"),
        ({"--layers": None, "--out": "e.npy"}, "--layers needs"),
        ({"--data": "nowhere"}, "not 'digits'"),
        ({"--device": "banana"}, "device"),
        ({"--model": "no_such_model"}, "unknown model"),
    ],
)
def test_embed_cli_bad_input_is_one_line(tmp_path, capsys, options, message):
    from esh.cli import main

    given = {"--model": "mambavision_nano", "--data": _npz(tmp_path, 4), "--out": "e.npz", **options}
    given["--out"] = str(tmp_path / given["--out"])
    argv = ["embed"] + [a for k, v in given.items() for a in ((k,) if v is None else (k, v))]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
