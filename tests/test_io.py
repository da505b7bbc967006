"""esh._io: outputs written whole, with the umask's permissions, and a failed write (a full
disk) that leaves the previous file and no temporary file behind, reported in one line."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import pytest
import torch

from esh._io import WriteError, atomic_dir, atomic_path, atomic_write, clean_stale_temps, save_torch, write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_and_folders_take_the_umask(tmp_path, umask_022):
    write_text(tmp_path / "a.txt", "x")
    save_torch({"w": torch.ones(2)}, tmp_path / "w.pth")
    with atomic_dir(tmp_path / "model") as folder:
        (folder / "config.json").write_text("{}")
    assert _mode(tmp_path / "a.txt") == 0o644 and _mode(tmp_path / "w.pth") == 0o644
    assert _mode(tmp_path / "model") == 0o755
    old = os.umask(0o077)
    try:
        write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "b.txt") == 0o600


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "last.pth"
    save_torch({"step": 1}, target)
    with pytest.raises(ZeroDivisionError), atomic_write(target, "wb") as f:
        f.write(b"half")
        1 / 0  # noqa: B018 - the writer fails midway
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 20971584 vs 20971472"),
    ],
    ids=["ENOSPC", "torch.save"],
)
def test_a_full_disk_is_one_line_naming_the_path_and_the_free_space(tmp_path, failure):
    target = tmp_path / "last.pth"
    write_text(target, "previous")
    with pytest.raises(WriteError) as info, atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise failure
    message = str(info.value)
    assert "\n" not in message and str(target) in message
    assert "no space left" in message and "free" in message
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_temporaries_of_killed_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".last.pth.tmp{dead_pid}"
    stale.write_bytes(b"x" * 100)
    live = tmp_path / f".last.pth.tmp{os.getppid()}"
    live.write_bytes(b"y")
    other = tmp_path / "keep.tmp123"  # not esh's naming: left alone
    other.write_bytes(b"z")
    assert clean_stale_temps(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_an_unwritable_folder_is_one_line(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(WriteError, match="could not write"):
            write_text(folder / "a.txt", "x")
    finally:
        folder.chmod(0o700)
