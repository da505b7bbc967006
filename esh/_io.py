"""Writing outputs without losing work: every file esh writes goes to a temporary file in the
same folder, is flushed to disk, gets the permissions a plain ``open`` would give it under the
user's umask, and is renamed over the target only when complete. A crash or a full disk leaves
the previous file intact and no temporary file behind."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from esh.errors import EshError

TMP_MARK = ".tmp"


class WriteError(EshError, OSError):
    """An output could not be written (no space left, no permission); the previous file, if
    any, is unchanged."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if free < 1024 or unit == "TB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return "unknown"


def _is_no_space(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save reports a failed write as RuntimeError("[enforce fail at inline_container.cc ...")
    return isinstance(e, RuntimeError) and ("inline_container" in str(e) or "file write failed" in str(e))


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed esh processes left in ``folder`` (their PID no
    longer runs). Returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.glob(f".*{TMP_MARK}*"):
        pid = p.name.rsplit(TMP_MARK, 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_failed(path: Path, e: BaseException) -> WriteError:
    if _is_no_space(e):
        return WriteError(f"could not write {path}: no space left on the device ({_free_space(path.parent)} free)")
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return WriteError(f"could not write {path}: {reason}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, mode: int = 0o666) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that takes a file name
    (``torch.save``, ``savefig``, ``safetensors``, ONNX export); on success it is fsynced, given
    ``mode`` under the umask and renamed over ``path``. On failure it is removed, the previous
    file stays, and the error becomes a one-line :class:`WriteError` when it is the disk's."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_failed(path, e) from e
    tmp = _temp_name(path)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, mode & ~_umask())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:
        if isinstance(e, EshError):
            raise
        raise _write_failed(path, e) from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = None, newline: str | None = None):
    """``open(path, mode)`` that only replaces ``path`` once the block has finished without
    an error (see :func:`atomic_path`)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write opens files for writing ('w' or 'wb'), not {mode!r}")
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding, newline=newline) as f:
        yield f


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def save_torch(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_path`."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 100, metadata: dict | None = None) -> Path:
    """A matplotlib figure written as a PNG through :func:`atomic_path`. A figure that pyplot
    manages is closed afterwards, written or not, so repeated plots do not pile up."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, metadata=metadata)
    finally:
        if getattr(fig.canvas, "manager", None) is not None:
            import matplotlib.pyplot as plt

            plt.close(fig)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it gets the umask's permissions and
    replaces ``path`` (an existing folder is moved aside first and removed after)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent))
    except OSError as e:
        raise _write_failed(path, e) from e
    # mkdtemp names end in random letters; rename to the PID form clean_stale_temps recognises
    final_tmp = _temp_name(path)
    shutil.rmtree(final_tmp, ignore_errors=True)
    os.replace(tmp, final_tmp)
    tmp = final_tmp
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:
        if old.exists() and not path.exists():
            os.replace(old, path)
        if isinstance(e, EshError):
            raise
        raise _write_failed(path, e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
