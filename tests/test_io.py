"""protein_lm.io: a file or directory is at its path complete or not at all, and nothing temporary is left."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from protein_lm import io


def _names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_file_replaces_the_old_content_with_default_permissions(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    assert io.write_text(path, "new\n") == path
    assert path.read_text() == "new\n" and _names(tmp_path) == ["out.json"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert _mode(path) == 0o666 & ~mask  # not mkstemp's private 0600
    io.write_bytes(tmp_path / "fresh.bin", b"\x00\x01")
    assert (tmp_path / "fresh.bin").read_bytes() == b"\x00\x01"


def test_a_failure_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"previous")

    def half_then_fail(tmp):
        tmp.write_bytes(b"partial")
        assert tmp.parent == path.parent and tmp.name.startswith(".weights.pt.tmp-")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        io.write_file(path, half_then_fail)
    assert path.read_bytes() == b"previous" and _names(tmp_path) == ["weights.pt"]


def test_a_failed_rename_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text("previous")

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError, match="No space"):
        io.write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "previous" and _names(tmp_path) == ["a.txt"]


def test_the_file_is_flushed_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    path = tmp_path / "x.txt"
    io.write_text(path, "x")
    kinds = [e[0] for e in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert os.path.basename(events[0][1]).startswith(".x.txt.tmp-")  # the temporary file itself
    assert events[1][1] == str(path) and events[2][1] == str(tmp_path)  # then its directory


def test_replace_dir_swaps_in_the_new_directory(tmp_path):
    out = tmp_path / "analysis"
    out.mkdir()
    (out / "old.csv").write_text("old")
    new = io.scratch_dir(out)
    mask = os.umask(0o022)
    os.umask(mask)
    assert new.parent == tmp_path and _mode(new) == 0o777 & ~mask  # an ordinary directory, not 0700
    (new / "sub").mkdir()
    (new / "sub" / "a.npy").write_bytes(b"a")
    io.replace_dir(new, out)
    assert _names(out) == ["sub"] and (out / "sub" / "a.npy").read_bytes() == b"a"
    assert _names(tmp_path) == ["analysis"]  # neither the scratch nor the old one is left


def test_replace_dir_puts_the_old_one_back_when_the_swap_fails(tmp_path, monkeypatch):
    out = tmp_path / "cache"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    new = io.scratch_dir(out)
    (new / "manifest.json").write_text("new")
    real = os.replace

    def fail_the_second(src, dst):
        if os.fspath(src) == os.fspath(new):
            raise OSError(18, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_the_second)
    with pytest.raises(OSError, match="cross-device"):
        io.replace_dir(new, out)
    monkeypatch.undo()
    assert (out / "manifest.json").read_text() == "old"
    assert _names(tmp_path) == sorted(["cache", new.name])  # the caller still owns (and removes) new


def test_replace_dir_with_a_named_aside_replaces_a_file_too(tmp_path):
    path, part, old = tmp_path / "last.ckpt", tmp_path / "last.ckpt.part", tmp_path / "last.ckpt.old"
    path.write_bytes(b"full checkpoint file")
    old.mkdir()  # debris of an earlier save killed between the two renames
    part.mkdir()
    (part / "shard-0").write_bytes(b"0")
    io.replace_dir(part, path, aside=old)
    assert path.is_dir() and (path / "shard-0").read_bytes() == b"0"
    assert _names(tmp_path) == ["last.ckpt"]


def test_remove_stale_removes_only_what_dead_processes_left(tmp_path):
    out = tmp_path / "cache"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    host = io._host()
    stale_dir = tmp_path / f".cache.tmp-{host}-{dead_pid}-abc"
    stale_dir.mkdir()
    (stale_dir / "tokens.u8").write_bytes(b"x")
    stale_file = tmp_path / f".cache.old-{host}-{dead_pid}-def"
    stale_file.write_bytes(b"x")
    live = tmp_path / f".cache.tmp-{host}-{os.getppid()}-ghi"  # our parent is alive
    live.mkdir()
    other_host = tmp_path / f".cache.tmp-otherhost-{dead_pid}-jkl"  # its processes are not ours to see
    other_host.mkdir()
    mine = io.scratch_dir(out)
    assert sorted(io.remove_stale(out)) == sorted([stale_dir, stale_file])
    assert _names(tmp_path) == sorted([live.name, other_host.name, mine.name])


def test_remove_path_takes_files_trees_links_and_nothing(tmp_path):
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "tree")
    for name in ("link", "tree", "file", "absent"):
        io.remove_path(tmp_path / name)
    assert _names(tmp_path) == []
