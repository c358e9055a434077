"""Atomic file writes: the one helper every writer of the project uses.

A write goes to a hidden temporary file in the same folder, then replaces the target with
``os.replace``: a crash (or a full disk) never leaves a half-written file in place of a
finished one, and a reader never sees a partial file.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> atomic_write(d / "a.txt", lambda tmp: tmp.write_text("hi")).name
'a.txt'
>>> (d / "a.txt").read_text(), sorted(p.name for p in d.iterdir())
('hi', ['a.txt'])
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from pathlib import Path


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name a write of ``path`` goes through first (hidden, same folder, same
    suffix so that writers that pick a format by extension still do)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to write the file at a temporary path, then rename it to ``path``.
    On any failure the temporary file is removed and the error re-raised; ``path`` is
    untouched."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


_TEMP = re.compile(r"^\..+\.tmp(\d+)(\.[^.]*)?$")  # temp_path's names


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of writes that never finished (their process was killed)
    anywhere below ``folder``: names of ``temp_path``'s form whose process is gone. A live
    process's temporary file is left alone. Returns the files removed.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / ".df.tmp999999999.pth").write_bytes(b"half"), (d / "df.pth").write_bytes(b"x")
    >>> [p.name for p in remove_stale_temps(d)], sorted(p.name for p in d.iterdir())
    (['.df.tmp999999999.pth'], ['df.pth'])
    """
    removed = []
    for p in Path(folder).rglob(".*.tmp*"):
        m = _TEMP.match(p.name)
        if m and p.is_file() and not _alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed
