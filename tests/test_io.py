"""Atomic writes (nextstep.io): the old file or folder stays whole until the new one is on disk beside it."""

import os
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import nextstep.io as io
from nextstep.io import atomic_directory, atomic_path, atomic_write_text


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@given(text=st.text())
def test_atomically_written_text_reads_back_as_written(text):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "notes.txt"
        atomic_write_text(path, "an older version")
        atomic_write_text(path, text)
        with open(path, newline="") as handle:
            assert handle.read() == text
        assert os.listdir(directory) == ["notes.txt"]


def test_the_temporary_file_lies_hidden_beside_the_target(tmp_path):
    target = tmp_path / "nested" / "report.json"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".report.json.") and tmp.name.endswith(".tmp")
        tmp.write_text("{}")
        assert not target.exists()
    assert target.read_text() == "{}"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]


def test_a_writer_that_fails_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_text_that_cannot_be_encoded_leaves_the_old_file_whole(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(target, "new \ud800")  # a lone surrogate: encoding fails once the file is open
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def _record_fsyncs_and_replaces(monkeypatch):
    """Patch ``os.fsync`` and ``os.replace`` as nextstep.io calls them; returns the events, in order:
    ``("fsync", inode)`` for a regular file flushed, ``("replace", source)`` for a rename."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        status = os.fstat(fd)
        if stat.S_ISREG(status.st_mode):
            events.append(("fsync", status.st_ino))
        return real_fsync(fd)

    def replace(source, destination):
        events.append(("replace", Path(source)))
        return real_replace(source, destination)

    monkeypatch.setattr(io.os, "fsync", fsync)
    monkeypatch.setattr(io.os, "replace", replace)
    return events


def test_a_file_is_flushed_to_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    events = _record_fsyncs_and_replaces(monkeypatch)
    atomic_write_text(tmp_path / "a.txt", "content")
    inode = (tmp_path / "a.txt").stat().st_ino
    assert events.index(("fsync", inode)) < [kind for kind, _ in events].index("replace")


def test_every_file_of_a_directory_is_flushed_before_the_directory_is_renamed_into_place(tmp_path, monkeypatch):
    events = _record_fsyncs_and_replaces(monkeypatch)
    with atomic_directory(tmp_path / "model") as staging:
        (staging / "config.json").write_text("{}")
        (staging / "tokenizer").mkdir()
        (staging / "tokenizer" / "vocab.txt").write_text("a b c")
    inodes = {(tmp_path / "model" / name).stat().st_ino for name in ("config.json", "tokenizer/vocab.txt")}
    renamed = [kind for kind, _ in events].index("replace")
    assert inodes <= {inode for kind, inode in events[:renamed] if kind == "fsync"}


def test_a_folder_that_may_not_be_replaced_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "notes.md").write_text("precious")
    wrote = []
    with pytest.raises(FileExistsError, match="choose another folder"):
        with atomic_directory(tmp_path / "runs") as staging:
            wrote.append(staging)
    assert wrote == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert (tmp_path / "runs" / "notes.md").read_text() == "precious"


def test_files_of_an_atomic_directory_get_an_ordinary_files_mode_whoever_writes_them(tmp_path):
    with atomic_directory(tmp_path / "model") as staging:
        (staging / "config.json").write_text("{}")
        os.chmod(staging / "config.json", 0o600)  # as a writer that makes owner-only files leaves them
        (staging / "sub").mkdir()
        (staging / "sub" / "weights.bin").write_bytes(b"\0")
        os.chmod(staging / "sub" / "weights.bin", 0o600)
    for name in ("config.json", "sub/weights.bin"):
        assert (tmp_path / "model" / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name


@pytest.mark.parametrize("name, is_path", [
    ("emoji-shapes-64", False), ("tiny", False), ("nextstep_1_large", False),
    ("runs/model", True), ("C:\\models\\mine", True), ("model.v2", True), ("weights.safetensors", True),
])
def test_a_name_with_a_folder_separator_or_a_suffix_is_a_path(name, is_path):
    from nextstep.builders import check_preset_name
    from nextstep.io import names_a_path

    assert names_a_path(name) is is_path
    if is_path:
        with pytest.raises(FileNotFoundError, match="expected a model directory at"):
            check_preset_name(name)


def test_a_replaced_file_keeps_its_mode_and_a_link_its_target(tmp_path):
    from nextstep.io import atomic_write_text

    private = tmp_path / "private.json"
    private.write_text("old")
    private.chmod(0o600)
    atomic_write_text(private, "new")
    assert private.read_text() == "new" and private.stat().st_mode & 0o777 == 0o600
    target = tmp_path / "target.json"
    target.write_text("old")
    (tmp_path / "link.json").symlink_to(target)
    atomic_write_text(tmp_path / "link.json", "new")
    assert (tmp_path / "link.json").is_symlink() and target.read_text() == "new"


def test_a_file_is_written_whatever_the_umask_and_gets_the_mode_it_allows(tmp_path, monkeypatch):
    """Under a umask that leaves the owner read-only, the file is still written (and fsynced) before it takes
    that mode."""
    import nextstep.io as io_module

    monkeypatch.setattr(io_module, "_UMASK", 0o277)
    io_module.atomic_write_text(tmp_path / "a.txt", "text")
    assert (tmp_path / "a.txt").read_text() == "text" and (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o400


def test_a_json_file_that_is_not_utf8_is_named(tmp_path):
    from nextstep.io import read_json_object

    (tmp_path / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match=r"config.json is not UTF-8 text, as a config.json is"):
        read_json_object(tmp_path / "config.json", "config.json")


def test_a_folder_that_cannot_be_written_is_named_by_its_own_path(tmp_path):
    from nextstep.io import atomic_directory

    (tmp_path / "file").write_text("a file where a folder would go")
    with pytest.raises(OSError, match=r"cannot write the folder .*file/out: "):
        with atomic_directory(tmp_path / "file" / "out"):
            pass
