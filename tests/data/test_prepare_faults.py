"""``prepare`` stopped from outside (SIGTERM, SIGKILL) or by a full disk leaves no temporary
directory, no worker process and no partial cache behind.

Real processes and signals (Linux). The inputs go through the reference FASTA parser (one bad
record per block, skipped), so tokenising them takes a few seconds: long enough to be stopped.
"""

from __future__ import annotations

import errno
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protein_lm.cli import main

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux signals and /proc")
REPO = Path(__file__).resolve().parents[2]


def _slow_fasta(path: Path, records: int = 30000) -> Path:
    rng = random.Random(0)
    seq = "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(300))
    bad = seq[:100] + "1" + seq[101:]  # an invalid character: the whole block takes the slow path
    with path.open("w") as fh:
        for i in range(records):
            s = bad if i % 50 == 0 else seq
            fh.write(f">r{i}\n" + "\n".join(s[j:j + 60] for j in range(0, 300, 60)) + "\n")
    return path


def _prepare(inputs: list[Path], out: Path, *extra: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "protein_lm", "prepare", *map(str, inputs), "--out", str(out),
            "--on-invalid", "skip", "--quiet", *extra]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _scratch(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*"))


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def _wait_for(condition, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_sigterm_removes_the_temporary_directory(tmp_path):
    out = tmp_path / "cache"
    proc = _prepare([_slow_fasta(tmp_path / "a.fasta")], out)
    _wait_for(lambda: _scratch(out) or proc.poll() is not None)
    assert proc.poll() is None, "prepare finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "protein-lm prepare: terminated" in err, err
    assert "Traceback" not in err
    assert _scratch(out) == [] and not out.exists()


def test_workers_die_with_a_killed_parent_and_the_next_run_removes_its_scratch(tmp_path):
    out = tmp_path / "cache"
    inputs = [_slow_fasta(tmp_path / f"{name}.fasta") for name in "ab"]
    proc = _prepare(inputs, out, "--workers", "2")
    _wait_for(lambda: len(_children(proc.pid)) >= 2 or proc.poll() is not None)
    workers = _children(proc.pid)
    assert proc.poll() is None and len(workers) >= 2
    proc.kill()
    proc.communicate(timeout=30)

    def gone() -> bool:
        return not any(Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2]
                       for w in workers)

    _wait_for(gone, timeout=10)
    stale = _scratch(out)
    assert stale, "the killed run should have left its temporary directory"
    small = tmp_path / "small.fasta"
    small.write_text(">p\nMKV\n")
    assert main(["prepare", str(small), "--out", str(out), "--quiet"]) == 0
    assert _scratch(out) == [] and (out / "manifest.json").is_file()


def test_scratch_of_a_live_run_is_left_alone(tmp_path):
    out = tmp_path / "cache"
    live = tmp_path / f".cache.tmp-{os.uname().nodename.replace('-', '_')}-{os.getppid()}-abc"
    live.mkdir()
    small = tmp_path / "small.fasta"
    small.write_text(">p\nMKV\n")
    assert main(["prepare", str(small), "--out", str(out), "--quiet"]) == 0
    assert live.is_dir()


def _fsize_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_full_disk_is_one_line_and_leaves_no_partial_cache(tmp_path, workers):
    out = tmp_path / "cache"
    inputs = [_slow_fasta(tmp_path / f"{n}.fasta", records=2000) for n in "ab"]
    proc = _prepare(inputs, out, "--workers", workers, preexec_fn=_fsize_limit(200_000))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert err.strip() == f"protein-lm prepare: error: {out}: cannot write the cache: {os.strerror(errno.EFBIG)}"
    assert not out.exists() and _scratch(out) == []


def test_no_space_left_while_writing_the_offsets(tmp_path, capsys, monkeypatch):
    import protein_lm.data.cache as cache

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache, "_write_offsets", full)
    out = tmp_path / "cache"
    small = tmp_path / "small.fasta"
    small.write_text(">p\nMKV\n")
    assert main(["prepare", str(small), "--out", str(out), "--quiet"]) == 2
    assert f"{out}: cannot write the cache: No space left on device" in capsys.readouterr().err
    assert not out.exists() and _scratch(out) == []
