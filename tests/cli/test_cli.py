from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

import esh
from esh.cli import main
from esh.errors import InputError


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"esh {esh.__version__}"


def test_python_dash_m_esh_is_the_same_command():
    r = subprocess.run([sys.executable, "-m", "esh", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"esh {esh.__version__}"


def test_models_lists_registered_names(capsys):
    @esh.register_model
    def esh_cli_test_model(pretrained=False, checkpoint_path=None, **kwargs):
        raise AssertionError("not built by listing")

    try:
        assert main(["models", "esh_cli_test*"]) == 0
        assert capsys.readouterr().out.split() == ["esh_cli_test_model"]
        assert main(["models", "no_such_model_pattern*"]) == 1
        assert "no models matching" in capsys.readouterr().err
    finally:
        esh.models.registry._unregister("esh_cli_test_model")


def test_bench_scan_prints_the_table(capsys):
    assert main(["bench", "scan", "--shape", "1,8,20,4", "--repeats", "1", "--threads", "0", "--no-memory"]) == 0
    out = capsys.readouterr().out
    assert "| method |" in out and "floor" in out
    for method in ("reference", "esh"):
        assert f"| {method} |" in out


def test_bench_scan_rejects_a_bad_shape(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "scan", "--shape", "1,8,20"])
    assert "four positive integers" in capsys.readouterr().err


def test_amp_dtype_is_one_flag_that_reaches_every_command_with_amp(monkeypatch, tmp_path):
    import esh.embed
    import esh.inference
    import esh.train
    import esh.train.lm_job

    seen = {}

    def record(name):
        def fake(*args, **kwargs):
            seen[name] = kwargs
            raise InputError("stop here")  # a user error: main() returns 2

        return fake

    monkeypatch.setattr(esh.train, "train", record("train"))
    monkeypatch.setattr(esh.train.lm_job, "train_lm", record("lm"))
    monkeypatch.setattr(esh.embed, "get_adapter", record("embed"))
    monkeypatch.setattr(esh.inference, "evaluate", record("eval"))
    monkeypatch.setattr(esh.inference, "predict", record("predict"))
    resolved = SimpleNamespace(model=None, name="m", class_names=None, img_size=None, crop_pct=None)
    monkeypatch.setattr("esh.cli._common.load_model", lambda args: resolved)
    model = ["--model", "mambavision_nano"]
    commands = {
        "train": ["train", "--resume", str(tmp_path)],
        "lm": ["lm", "train"],
        "embed": ["embed", *model, "--data", "digits", "--out", str(tmp_path / "e.npy")],
        "eval": ["eval", *model, "--data", "digits"],
        "predict": ["predict", *model, "x.png"],
    }
    for name, argv in commands.items():
        assert main([*argv, "--amp", "--amp-dtype", "float16"]) == 2, name
        assert seen.pop(name)["amp_dtype"] == "float16", name
        main([*argv, "--amp"])
        assert seen.pop(name).get("amp_dtype") is None, name  # unset: the device's default
    with pytest.raises(SystemExit):
        main(["train", "--amp-dtype", "float8"])


@pytest.mark.parametrize("error", [MemoryError(), "torch"])
def test_running_out_of_memory_is_one_line_that_names_the_sizes(error, monkeypatch, capsys):
    import torch

    import esh.info

    if error == "torch":
        error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB. GPU 0 has ...")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(esh.info, "model_info", fail)
    assert main(["info", "mambavision_nano", "--img-size", "100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "out of memory" in err and "--img-size" in err


def test_a_fifo_given_as_an_image_is_refused_without_hanging(tmp_path, capsys):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for argv in (["predict", "--model", "mambavision_nano"], ["saliency", "--model", "esh_vision_nano", "--image"]):
        assert main([*argv, str(fifo)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "not a regular file" in err, err
