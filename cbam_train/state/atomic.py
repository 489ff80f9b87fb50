"""One atomic writer for every file the tool writes (checkpoints, model.pt, JSON, CSV, the data cache):
a temp file in the same folder, fsync, rename, fsync of the folder. A reader or a crash never sees half a file."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it (briefly)
    os.umask(mask)
    return mask


_umask = [_read_umask()]


def _umask_now() -> int:
    """The process umask, read on the main thread only: the umask is process-wide, and setting it from the
    checkpoint-writer thread would briefly change the mode of files the training thread creates."""
    if threading.current_thread() is threading.main_thread():
        _umask[0] = _read_umask()
    return _umask[0]


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(f) on a temp file beside `path`, fsync it, rename it to `path` and fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask_now())  # mkstemp makes 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save, atomically (see atomic_write)."""
    import torch  # here, not at the top: the CLI imports this module, and a config error should not wait for torch

    atomic_write(path, lambda f: torch.save(obj, f))


def write_text_atomic(path: Path, text: str) -> None:
    """UTF-8 text, atomically (see atomic_write)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: Path, obj: Any) -> None:
    """obj as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def link_or_copy(src: Path, dst: Path) -> None:
    """Make dst an atomic copy of src: a hard link (free; src's later replacement leaves it alone), else a copy."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
