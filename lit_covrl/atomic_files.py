"""Atomic file writes on a local filesystem: a failed or killed write never leaves an unreadable
file at the target name, and never destroys the file that was there.

Every file is written to a temporary name *in the target folder*, flushed and fsynced, then
renamed over the target (`os.replace`, atomic on POSIX within one filesystem), and the folder is
fsynced so the rename itself survives a power loss. On any failure the temporary file is removed
and a `CheckpointWriteError` names the checkpoint, the temporary file and the cause; the file at
the checkpoint name (if any) is the previous, complete one. A kill -9 can leave a stray
temporary file (`.<name>.<random>.tmp`, never matching `*.ckpt`), never a broken checkpoint;
`lit_covrl.checkpointing.AtomicCheckpoint` removes such leftovers when the next fit starts in that folder.

- `atomic_write(path, write)`: the primitive.
- `replace_path(src, dst)`: a complete file or folder swapped in at `dst` (a distributed
  checkpoint folder, `lit_covrl.sharding.FSDP2Strategy`); `fsync_tree` before it.

No Lightning here: `lit_covrl.checkpointing` puts these under Lightning's checkpoint IO and callback.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Callable
from typing import IO

__all__ = ["CheckpointWriteError", "atomic_write", "replace_path", "fsync_tree", "temporary_name", "is_temporary_name"]


class CheckpointWriteError(OSError):
    """A checkpoint file could not be written; the previous file at that name is unchanged."""


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform that cannot open folders: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind `err`, if any: torch.save reports a failed write of its file object as a
    RuntimeError ("unexpected pos ...") whose context is the OSError (e.g. ENOSPC)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def temporary_name(path: str | os.PathLike) -> str:
    """`<folder>/.<name>.<8 random hex digits>.tmp`: hidden, never `*.ckpt`, never "last*"."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")


def is_temporary_name(name: str) -> bool:
    """A name made by `temporary_name` (left behind by a killed write)."""
    return re.fullmatch(r"\..+\.[0-9a-f]{8}\.tmp", name) is not None


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(f)` on a temporary file next to `path`, fsync it and rename it over `path`.

    Raises CheckpointWriteError (the cause chained) if anything fails; the temporary file is then
    removed and `path` is untouched.
    """
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "xb") as f:  # a new file with the umask's permissions, as a plain save would have
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if not isinstance(err, Exception):  # KeyboardInterrupt, SystemExit: re-raise as they are
            raise
        cause = _os_error_in(err) or err
        raise CheckpointWriteError(
            f"could not write checkpoint {path!r}: {type(cause).__name__}: {cause} (temporary file {tmp!r} "
            "removed; the file at the checkpoint name, if any, is the previous complete checkpoint)"
        ) from err
    _fsync_dir(folder)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under `folder`, then the folders themselves."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def replace_path(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Put `src` (a complete file or folder, on dst's filesystem) at `dst` and delete what was there.

    A folder cannot be renamed over a non-empty one: on Linux the two are swapped atomically
    (renameat2), elsewhere `dst` is first moved aside to `<dst>.<pid>.old`, so a kill in between
    leaves the previous checkpoint there rather than at its name."""
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.lexists(dst):
        os.rename(src, dst)
    elif _exchange(src, dst):
        _remove(src)  # now the previous checkpoint
    else:
        old = f"{dst}.{os.getpid()}.old"
        os.rename(dst, old)
        os.rename(src, dst)
        _remove(old)
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))
