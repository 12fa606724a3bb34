"""Fault injection for file writes into one folder: a disk that fills up, a write that stalls.

`faulty_folder(folder, ...)` wraps every file opened for writing inside `folder` or its subfolders
(through the builtin `open` and `io.open`, which `torch.save`, `shutil`, fsspec and pathlib, hence
torch.distributed.checkpoint, use) and counts the bytes written there:
- `capacity=N`: the folder's filesystem holds N bytes in all; the write that crosses N writes what
  fits and raises OSError(ENOSPC), as a full disk does;
- `stall_on_file=k, marker=path`: the k-th file opened for writing writes its first block, flushes
  it, creates `marker` and sleeps (the parent process then kills it).
`os.sendfile` is made unavailable meanwhile, so `shutil` copies pass through the wrapped writes.
It yields a list of the paths opened for writing anywhere (in the folder or not).
"""
from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import time
from pathlib import Path


class _Disk:
    def __init__(self, capacity: int | None, stall_on_file: int | None, marker: str | None) -> None:
        self.capacity, self.stall_on_file, self.marker = capacity, stall_on_file, marker
        self.used = 0
        self.files = 0


class _WrappedFile:
    def __init__(self, f, disk: _Disk, stall: bool) -> None:
        self._f, self._disk, self._stall = f, disk, stall

    def write(self, data) -> int:
        data = bytes(data)
        disk = self._disk
        if disk.capacity is not None and disk.used + len(data) > disk.capacity:
            fits = max(disk.capacity - disk.used, 0)
            self._f.write(data[:fits])
            disk.used += fits
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._f.name)
        n = self._f.write(data)
        disk.used += len(data)
        if self._stall:
            self._f.flush()
            Path(disk.marker).touch()
            time.sleep(600)
        return n

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


@contextlib.contextmanager
def faulty_folder(folder, *, capacity: int | None = None, stall_on_file: int | None = None,
                  marker: str | None = None):
    folder = os.path.realpath(folder)
    disk = _Disk(capacity, stall_on_file, marker)
    real_open, real_sendfile = builtins.open, os.sendfile
    assert io.open is real_open
    opened: list[str] = []

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, int) or not any(c in mode for c in "wax+"):
            return f
        path = os.path.realpath(os.fspath(file))
        opened.append(path)
        if not (os.path.dirname(path) + os.sep).startswith(folder + os.sep):
            return f
        disk.files += 1
        return _WrappedFile(f, disk, stall=disk.files == stall_on_file)

    def no_sendfile(*args, **kwargs):
        raise OSError(errno.ENOSYS, "sendfile disabled by the fault injector")

    builtins.open = io.open = fake_open
    os.sendfile = no_sendfile
    try:
        yield opened
    finally:
        builtins.open = io.open = real_open
        os.sendfile = real_sendfile
