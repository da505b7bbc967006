"""The README as a new user meets it: every Python block runs on its own, as written, in a fresh
interpreter, and every ``esh`` command line in it parses (the cheap, offline ones also run).

The files the blocks name (the authors' released checkpoints, an image, the main job's
output) cannot be downloaded here; the fixture writes stand-ins in the authors' formats, with
random weights, into the folder the blocks run in. A block that needs the network says so
with a ``# needs network`` comment on its first line and is only checked for syntax.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import esh
from esh.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
NEEDS_NETWORK = "# needs network"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks() -> list[tuple[int, str, str]]:
    text = README.read_text(encoding="utf-8")
    return [(text[: m.start()].count("\n") + 1, m.group(1), m.group(2)) for m in _FENCE.finditer(text)]


PYTHON_BLOCKS = [(line, code) for line, lang, code in _blocks() if lang == "python"]


def _command_lines() -> list[tuple[int, str]]:
    """``esh ...`` lines of the shell blocks that are concrete commands (no ``[...]`` or ``A|B``
    synopsis), with their trailing comments removed."""
    lines = []
    for start, lang, code in _blocks():
        if lang not in ("", "bash", "sh"):
            continue
        for offset, line in enumerate(code.splitlines(), start=1):
            command = line.split("  #", 1)[0].split(" # ", 1)[0].strip()
            for part in command.split("&&"):
                part = part.strip()
                if not part.startswith("esh ") or any(c in part for c in "[|…") or "..." in part:
                    continue
                lines.append((start + offset, part))
    return lines


COMMANDS = _command_lines()


def test_the_readme_has_blocks_to_check():
    assert len(PYTHON_BLOCKS) >= 10
    assert len(COMMANDS) >= 15 and len(RUNNABLE) >= 3


def _write_stand_ins(folder: Path) -> None:
    """The files the README's blocks name, in the formats their authors publish."""
    g = torch.Generator().manual_seed(0)
    mv = esh.create_model("mambavision_t")
    torch.save(
        {"epoch": 309, "state_dict": mv.state_dict(), "args": argparse.Namespace(model="mamba_vision_T")},
        folder / "mambavision_tiny_1k.pth.tar",
    )
    vim = esh.create_model("vim_tiny")
    state = vim.state_dict()
    torch.save(
        {"model": state, "model_ema": state, "epoch": 299, "args": argparse.Namespace(model="vim_tiny")},
        folder / "vim_t_midclstok_76p1acc.pth",
    )
    from PIL import Image

    from esh.data.datasets import DIGITS_FILE

    with np.load(DIGITS_FILE) as f:
        digit = f["images"][0]
    Image.fromarray(digit).save(folder / "digit.png")
    photo = (torch.rand(96, 128, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(photo).save(folder / "photo.jpg")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    _write_stand_ins(folder)
    return folder


def _run(code: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
@pytest.mark.parametrize(("line", "code"), PYTHON_BLOCKS, ids=[f"line{line}" for line, _ in PYTHON_BLOCKS])
def test_python_block_runs_on_its_own(line, code, workdir):
    ast.parse(code)  # a syntax error fails here with the README's line in the test id
    if code.lstrip().startswith(NEEDS_NETWORK):
        return
    result = _run(code, workdir)
    assert result.returncode == 0, f"README.md line {line}:\n{result.stderr[-3000:]}"


# commands that need no data, network or minutes: these README lines are run as written
OFFLINE = ("esh --version", "esh models", "esh info")
RUNNABLE = [(line, c) for line, c in COMMANDS if c.startswith(OFFLINE)]


@pytest.mark.slow
@pytest.mark.parametrize(("line", "command"), RUNNABLE, ids=[f"line{line}" for line, _ in RUNNABLE])
def test_offline_command_line_runs(line, command, workdir):
    argv = shlex.split(command)
    result = subprocess.run(
        [sys.executable, "-m", "esh", *argv[1:]], cwd=workdir, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"README.md line {line}: `{command}`\n{result.stderr[-2000:]}"
    assert result.stdout.strip(), f"README.md line {line}: `{command}` printed nothing"


@pytest.mark.parametrize(("line", "command"), COMMANDS, ids=[f"line{line}" for line, _ in COMMANDS])
def test_command_line_parses(line, command):
    argv = shlex.split(command)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's way of refusing (and of finishing --version / --help)
        if e.code in (0, None):
            return
        pytest.fail(f"README.md line {line}: `{command}` does not parse (exit {e.code})")
