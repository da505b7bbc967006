"""`import esh` and timm work even when torchvision was built for another torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from esh import _compat


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


def _plain_torchvision_import_is_broken() -> bool:
    r = _run("import torchvision")
    return r.returncode != 0 and "torchvision::" in r.stderr and "does not exist" in r.stderr


def test_import_esh_then_timm_works_in_a_fresh_interpreter():
    r = _run(
        """
        import esh, torch
        from esh._compat import import_timm, import_torchvision
        timm = import_timm()
        import_torchvision()
        import_torchvision()
        m = timm.create_model("resnet18", num_classes=3).eval()
        print("logits", tuple(m(torch.randn(1, 3, 32, 32)).shape))
        from timm.data import create_transform
        create_transform(224)
        """
    )
    assert r.returncode == 0, r.stderr
    assert "logits (1, 3)" in r.stdout
    if _plain_torchvision_import_is_broken():
        # the one warning, said once however many times torchvision is imported
        assert r.stderr.count("detection ops") == 1, r.stderr
    else:
        assert "detection ops" not in r.stderr


def test_only_the_mismatched_operator_failure_is_caught(monkeypatch):
    import importlib

    def fail(name, *a, **k):
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr(importlib, "import_module", fail)
    with pytest.raises(RuntimeError, match="CUDA driver"):
        _compat.import_torchvision()


def test_mismatch_is_repaired_and_warned_about(monkeypatch):
    import importlib

    real = importlib.import_module
    calls = []

    def flaky(name, *a, **k):
        if name == "torchvision":
            calls.append(name)
            if len(calls) == 1:
                raise RuntimeError("operator torchvision::nms does not exist")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", flaky)
    monkeypatch.setattr(_compat, "_warned", False)
    with pytest.warns(RuntimeWarning, match="detection ops"):
        tv = _compat.import_torchvision()
    assert tv.__name__ == "torchvision" and calls == ["torchvision", "torchvision"]
    assert _compat._op_exists("nms") and _compat._op_exists("qnms")


def test_optional_dependency_message_says_how_to_install():
    with pytest.raises(ImportError, match=r"pip install 'esh\[bnb\]'"):
        _compat.require("surely_not_installed_pkg_xyz", "bnb", "8-bit AdamW")
