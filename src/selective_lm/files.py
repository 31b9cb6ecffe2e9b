"""Files: atomic writes, JSON reading, content digests and fingerprints, the out-dir lock.

Everything a stage writes goes through the atomic helpers here, so that a killed process
never leaves a file that looks complete but is not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_sibling(path: Path) -> Path:
    """A temp file beside `path` with the mode a plain open() would give (mkstemp's is 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return Path(tmp)


def _make_parents(path: Path) -> list[Path]:
    """mkdir -p `path.parent`; the directories it created, deepest first (for `_remove_empty`)."""
    missing = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(created: list[Path]) -> None:
    """Undo `_make_parents` after a failed write: a bad input leaves no empty `data/` (or out dir) behind.
    rmdir removes only empty directories, so whatever another writer put there meanwhile stays."""
    for d in created:
        with contextlib.suppress(OSError):
            d.rmdir()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds (on failure the
    parent directories this call created go too, when empty)."""
    path = Path(path)
    created = _make_parents(path)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_empty(created)
        raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON atomically (temp file + rename); see `write_text`."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write atomically; an identical existing file is left untouched, so reruns change no mtime."""
    path = Path(path)
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if path.is_file() and path.read_text() == text:
            return
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | os.PathLike[str]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from e


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a directory under a temporary name; it replaces `path` only when the block succeeds (on failure the
    parent directories this call created go too, when empty)."""
    path = Path(path)
    created = _make_parents(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (config sections, file metadata)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (first 16 hex digits), read in 4 MB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def run_lock(path: Path) -> Iterator[None]:
    """One writer per out dir through the lock file `path`: a second holder fails naming the first;
    a dead holder's lock is taken over. The directories it created go when it ends empty (a check that failed
    before any write leaves no empty out dir)."""
    out = path.parent
    try:
        created = _make_parents(path)
    except OSError as e:
        raise UserError(f"cannot create output directory {out}: {e.strerror or e}") from None
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            text = path.read_text().strip() if path.exists() else ""
            pid = int(text) if text.isdigit() else 0
            if pid and pid != os.getpid() and _alive(pid):
                raise UserError(f"{out} is in use by another slm process (pid {pid}); wait for it or stop it") from None
            path.unlink(missing_ok=True)  # stale: its holder died
            continue
        except OSError as e:
            raise UserError(f"output directory {out} is not writable: {e.strerror or e}") from None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        _remove_empty(created)
