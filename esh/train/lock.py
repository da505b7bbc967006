"""One run per output directory: a lock file holding the PID of the process that trains into it.

A second run into the same folder is refused while that process lives; the lock of a process
that died (killed, crashed) is taken over."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from esh._io import _pid_alive
from esh.errors import InputError

LOCK_FILE = ".esh.lock"


class OutputLock:
    """``with OutputLock(folder):`` holds ``folder/.esh.lock`` for the block (created with
    ``O_EXCL``, so two starting runs cannot both take it)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.held = False

    def acquire(self) -> OutputLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner == os.getpid():  # this process holds it already (a nested lock): nothing to do
                    return self
                if owner is not None and _pid_alive(owner):
                    raise InputError(
                        f"{self.folder} is in use by another run (process {owner}): wait for it to finish, "
                        "or choose another output directory"
                    ) from None
                with contextlib.suppress(FileNotFoundError):  # a dead process's lock: take it over
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self.held = True
            return self
        raise InputError(f"could not take the lock {self.path}: other runs keep taking it")

    def _owner(self) -> int | None:
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def release(self) -> None:
        if self.held:
            self.held = False
            if self._owner() == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
