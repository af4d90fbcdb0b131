"""Atomic file writes: a crash never leaves a half-written file in place."""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _fsync_dir(path: Path) -> None:
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


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: setting the umask to read it is not thread-safe


def _umask() -> int:
    return _UMASK


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``.

    The writer writes to the yielded path. If the block raises (or the process
    dies), ``path`` keeps its previous content. The new file keeps the mode of the
    file it replaces (a new one gets 0666 less the umask), and a symbolic link at
    ``path`` has its target replaced.
    """
    path = Path(path)
    if path.is_symlink():  # the link's target is replaced, and the link kept
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates owner-only files; give the result the permissions of the file it replaces, or of an
    # ordinary new file.
    mode = path.stat().st_mode & 0o777 if path.is_file() else 0o666 & ~_umask()
    os.chmod(tmp_path, 0o600)  # writable by its writer whatever the umask, until it is complete
    try:
        yield tmp_path
        descriptor = os.open(tmp_path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        # Last: a writer that replaces the file (as safetensors does) leaves its own, owner-only, mode.
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


#: Files whose presence marks a directory as one `atomic_directory` may replace (what it writes).
REPLACEABLE_MARKERS = ("config.json",)
#: Files whose presence marks a directory `atomic_directory` replaces only when they are among its markers:
#: a training checkpoint's state (its folder also holds a config.json).
PROTECTED_MARKERS = ("trainer_state.json",)


@contextmanager
def atomic_directory(path: str | os.PathLike, *, markers: tuple[str, ...] = REPLACEABLE_MARKERS) -> Iterator[Path]:
    """Yield a staging directory; on success it takes the place of ``path``.

    Its files are flushed to disk before it is renamed into place. An existing
    directory at ``path`` is moved aside first and removed only after the new one
    is in place, so a crash leaves either the old or the new directory (or,
    between the two renames, the old one under the hidden name
    ``.<name>.moved-aside-<time>-*``, which no other code makes:
    `restore_moved_aside` puts it back; a rename that fails puts it back at once).
    Once the new one is in place the old one is renamed for removal before it is
    deleted, so a deletion that stops halfway never leaves a candidate to restore.
    Only an empty directory or one holding one of ``markers`` (a directory of the
    kind being written), and not a training checkpoint (`PROTECTED_MARKERS`), is
    replaced: any other is refused before anything is written. An old directory
    that an interrupted write left moved aside is put back first. A symbolic
    link to a directory has its target replaced.
    Files written into the staging directory get ordinary permissions (0666
    less the umask), whatever the library that wrote them chose.

    Raises:
        FileExistsError: ``path`` is a directory of other files.
        NotADirectoryError: ``path`` is a file.
    """
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    restore_moved_aside(path)  # an earlier write that stopped between its two renames: its old directory back
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.trash-*") if path.name else ():
        shutil.rmtree(leftover, ignore_errors=True)  # an earlier write's old directory, half deleted
    check_replaceable(path, markers)
    try:  # named by the folder asked for, not by the hidden staging name
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as error:
        raise OSError(f"cannot write the folder {path}: {error.strerror or error}") from None
    os.chmod(staging, 0o777 & ~_umask())
    try:
        yield staging
        file_mode = 0o666 & ~_umask()
        for item in sorted(staging.rglob("*"), reverse=True):  # files before the folders that hold them
            if item.is_file() and not item.is_symlink():
                os.chmod(item, file_mode)
                with open(item, "rb") as handle:  # on disk before the rename makes it visible
                    os.fsync(handle.fileno())
            elif item.is_dir() and not item.is_symlink():
                _fsync_dir(item)
        _fsync_dir(staging)
        backup = None
        if path.exists():
            check_replaceable(path, markers)
            backup = Path(tempfile.mkdtemp(prefix=f".{path.name}{_MOVED_ASIDE}{time.time_ns():020d}-",
                                           dir=path.parent))
            backup.rmdir()
            os.replace(path, backup)
        try:
            os.replace(staging, path)
        except BaseException:
            if backup is not None and not path.exists():
                os.replace(backup, path)  # the old directory back in its place
            raise
        _fsync_dir(path.parent)
        # The old directory, and any older one an earlier crash left aside: no longer candidates to restore,
        # however far their deletion gets.
        for old in _moved_aside(path):  # (the backup above among them)
            remove_directory(old, trash_name=path.name)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def remove_directory(path: str | os.PathLike, *, trash_name: str | None = None) -> None:
    """Delete the directory ``path`` so that a deletion stopped halfway leaves nothing under its name: it is
    renamed to the hidden ``.<trash_name>.trash-*`` (``trash_name`` defaults to its own name) beside it first,
    which `atomic_directory` clears."""
    path = Path(path)
    trash = Path(tempfile.mkdtemp(prefix=f".{trash_name or path.name}.trash-", dir=path.parent))
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def check_replaceable(path: Path, markers: tuple[str, ...] = REPLACEABLE_MARKERS) -> None:
    """Raise as `atomic_directory` would before replacing ``path``: for a file, a training checkpoint, or a
    folder of other files than one holding ``markers``. For a caller to refuse before costly work."""
    if not path.exists():
        return
    if not path.is_dir():
        raise NotADirectoryError(f"expected a directory at {path}, found a file")
    entries = sorted(entry.name for entry in path.iterdir())
    protected = [marker for marker in PROTECTED_MARKERS if marker not in markers and (path / marker).exists()]
    if protected:
        raise FileExistsError(f"expected a folder to write into at {path}, found a training checkpoint (it holds "
                              f"{protected[0]}); write elsewhere (a checkpoint loads as a model as it is)")
    if entries and not any((path / marker).exists() for marker in markers):
        raise FileExistsError(
            f"expected an empty folder or one written here before (with {' or '.join(markers)}) at {path}, "
            f"found a folder of {len(entries)} other entries ({', '.join(entries[:3])}"
            f"{', ...' if len(entries) > 3 else ''}); choose another folder")


_MOVED_ASIDE = ".moved-aside-"
_MOVED_ASIDE_NAME = re.compile(r"\.(?P<name>.+)\.moved-aside-(?P<time>\d{20})-[^/]+", re.DOTALL)


def moved_aside(directory: str | os.PathLike) -> dict[str, list[Path]]:
    """The directories `atomic_directory` moved aside in ``directory`` and that are still there, by the
    name they were moved from, oldest first (by the time in their names)."""
    directory = Path(directory)
    found: dict[str, list[tuple[str, Path]]] = {}
    if directory.is_dir():
        for child in directory.iterdir():
            match = _MOVED_ASIDE_NAME.fullmatch(child.name)
            if match and child.is_dir():
                found.setdefault(match["name"], []).append((match["time"], child))
    return {name: [child for _, child in sorted(backups)] for name, backups in found.items()}


def _moved_aside(path: Path) -> list[Path]:
    """The directories `atomic_directory` moved aside from ``path``, oldest first."""
    return moved_aside(path.parent).get(path.name, []) if path.name else []


def restore_moved_aside(path: str | os.PathLike) -> bool:
    """Put back the directory `atomic_directory` moved aside from ``path`` (the latest) when a crash came
    before the new one took its place (``path`` missing); whether it did."""
    path = Path(path)
    if path.exists():
        return False
    backups = _moved_aside(path)
    if not backups:
        return False
    os.replace(backups[-1], path)
    _fsync_dir(path.parent)
    return True


def what_is_at(path: str | os.PathLike) -> str:
    """What a message says was found at ``path``: "a file", "a directory", "nothing", or, where an
    interrupted `atomic_directory` left the old directory moved aside, "nothing (... rename it back)"."""
    path = Path(path)
    if path.is_file():
        return "a file"
    if path.is_dir():
        return "a directory"
    backups = _moved_aside(path)
    if backups:
        return (f"nothing, but {backups[-1]}, the earlier directory an interrupted write moved aside "
                f"(rename it to {path.name} to use it)")
    return "nothing"


def names_a_path(name: str) -> bool:
    """Whether a name given for a model, tokenizer or preset is written as a path (a folder separator or
    a suffix), so that nothing there is a missing file rather than an unknown name."""
    return any(separator in name for separator in ("/", "\\")) or bool(Path(name).suffix)


def read_json_object(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """Parse a JSON file that must hold an object.

    Args:
        path: the file.
        what: how error messages name the file (e.g. ``"Hugging Face config.json"``).

    Raises:
        FileNotFoundError: naming the path when there is no file.
        ValueError: naming the path for invalid JSON or a non-object value.
    """
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a {what} at {path}, found nothing")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text, as a {what} is: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data
