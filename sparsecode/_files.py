"""Atomic, durable file writes: the one writer behind every file the toolkit saves (SAE folders,
checkpoints, the activation cache, the feature browser, pruned models).

A file or folder is written under a temporary sibling name, flushed to disk (``fsync``) and
renamed into place, so a reader (or a crash) never sees half of it: after a crash there is the
old version or the new one, and at most a hidden ``.NAME.*.tmp`` sibling to ignore.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["atomic_folder", "atomic_write", "fsync", "is_temporary"]


def fsync(path: str | os.PathLike[str]) -> None:
    """Flush a file or folder to disk (best effort: folders cannot be opened on every OS)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask (read from /proc where it exists: setting it to read it back is not
    thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_mode(path: str | os.PathLike[str], base: int) -> None:
    """Give a temporary file (``base`` 0o666) or folder (0o777) the permissions a plain
    ``open`` / ``mkdir`` would have under the umask, not mkstemp's / mkdtemp's private 0o600 /
    0o700."""
    os.chmod(path, base & ~_umask())


def is_temporary(path: str | os.PathLike[str]) -> bool:
    """Is ``path`` a leftover of an interrupted write (a hidden ``.*.tmp`` / ``.*.old``)?"""
    name = Path(path).name
    return name.startswith(".") and name.endswith((".tmp", ".old"))


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` via a temporary file, fsync, rename.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = atomic_write(Path(d) / "a.txt", "hello")
    ...     p.read_text(), sorted(q.name for q in Path(d).iterdir())
    ('hello', ['a.txt'])
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _normal_mode(tmp, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync(path.parent)
    return path


def atomic_folder(folder: str | os.PathLike[str],
                  writers: Mapping[str, Callable[[Path], None]]) -> Path:
    """Write ``writers`` (file name -> function writing that file) into a temporary sibling of
    ``folder`` and rename it into place; an existing ``folder`` is replaced only at the end and
    restored if the final rename fails. Nothing is left behind on failure."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"cannot write folder {folder}: a file of that name exists")
    parent = folder.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=parent))
        _normal_mode(tmp, 0o777)
    except OSError as e:
        raise type(e)(f"cannot write folder {folder}: {e.strerror or e}") from e
    try:
        for name, write in writers.items():
            write(tmp / name)
            _normal_mode(tmp / name, 0o666)  # some writers (safetensors) create 0o600 files
            fsync(tmp / name)
        fsync(tmp)
        if folder.exists():
            old = parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.old"
            os.rename(folder, old)
            try:
                os.rename(tmp, folder)
            except BaseException:
                os.rename(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
        fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
