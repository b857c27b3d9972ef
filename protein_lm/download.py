"""Download UniProt release files: resumable (HTTP Range), with progress and checks.

Standard library only (urllib). The transfer goes to ``FILE.part``; an interrupted run
(network error, Ctrl-C) leaves that file, and the next run asks the server for the
rest with ``Range: bytes=N-``. Dropped connections are also retried (and resumed)
within one run. At the end the size must equal the server's ``Content-Length`` /
``Content-Range`` total and, where UniProt publishes one, the MD5 in the release's
``RELEASE.metalink`` must match; only then is ``FILE.part`` renamed to ``FILE``.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from protein_lm.errors import UserError
from protein_lm.io import replace_file

UNIPROT = "https://ftp.uniprot.org/pub/databases/uniprot"
#: name -> URL of the current release file. The same directory holds RELEASE.metalink
#: (Metalink XML with each file's size and MD5), which is used for the checksum.
SOURCES: dict[str, str] = {
    "swissprot": f"{UNIPROT}/current_release/knowledgebase/complete/uniprot_sprot.fasta.gz",
    "uniref50": f"{UNIPROT}/uniref/uniref50/uniref50.fasta.gz",
    "uniref90": f"{UNIPROT}/uniref/uniref90/uniref90.fasta.gz",
}
CHUNK = 1 << 20
USER_AGENT = "protein-lm-download/1 (+https://www.uniprot.org/help/downloads)"


@dataclass
class DownloadResult:
    path: Path
    size: int
    md5: str | None  # the verified MD5, or None when no checksum was published
    resumed_from: int  # bytes already present when this run started
    already_present: bool = False


class _Interrupted(Exception):
    """The connection dropped mid-transfer (retried with Range)."""


def metalink_url(url: str) -> str:
    """UniProt publishes ``RELEASE.metalink`` next to each release file."""
    return url.rsplit("/", 1)[0] + "/RELEASE.metalink"


def parse_metalink(xml_text: str | bytes, filename: str) -> tuple[int | None, str | None]:
    """``(size, md5)`` of ``filename`` in a Metalink 3 or 4 document (None if absent)."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError:
        return None, None

    def local(tag: str) -> str:
        return tag.rsplit("}", 1)[-1]

    for el in root.iter():
        if local(el.tag) == "file" and el.get("name", "").rsplit("/", 1)[-1] == filename:
            size = md5 = None
            for sub in el.iter():
                name = local(sub.tag)
                if name == "size" and sub.text and sub.text.strip().isdigit():
                    size = int(sub.text.strip())
                elif name == "hash" and (sub.get("type") or "").lower() == "md5" and sub.text:
                    md5 = sub.text.strip().lower()
            return size, md5
    return None, None


def _open(url: str, start: int = 0, timeout: float = 60.0):
    headers = {"User-Agent": USER_AGENT}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _fetch_small(url: str, timeout: float = 60.0) -> bytes | None:
    try:
        with _open(url, timeout=timeout) as resp:
            return resp.read(1 << 24)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _md5_of(path: Path) -> hashlib._Hash:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h


class _Progress:
    def __init__(self, name: str, enabled: bool):
        self.name, self.enabled = name, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.start = self.last = time.monotonic()
        self.shown = False

    def update(self, done: int, total: int | None, session_bytes: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < (0.5 if self.tty else 10.0)):
            return
        self.last = now
        rate = session_bytes / max(now - self.start, 1e-9) / 1e6
        of = f" of {total / 1e6:,.1f} MB ({100 * done / total:.1f}%)" if total else " MB"
        line = f"download: {self.name}: {done / 1e6:,.1f}{of} at {rate:,.1f} MB/s"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        self.shown = True

    def close(self) -> None:
        if self.tty and self.shown:
            print(file=sys.stderr, flush=True)


def _total_from(resp, start: int) -> int | None:
    cr = resp.headers.get("Content-Range")
    if cr:
        m = re.match(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", cr)
        if m and m.group(3) != "*":
            return int(m.group(3))
    cl = resp.headers.get("Content-Length")
    return start + int(cl) if cl and cl.isdigit() else None


def download(
    source: str,
    out_dir: str | os.PathLike,
    url: str | None = None,
    md5: str | None = None,
    checksum: bool = True,
    progress: bool = True,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 1.0,
) -> DownloadResult:
    """Download a UniProt release file into ``out_dir`` (resuming a previous ``.part``).

    Args:
        source: ``swissprot``, ``uniref50`` or ``uniref90`` (see :data:`SOURCES`).
        url: another URL for the file (a mirror, or a test server).
        md5: expected MD5; by default read from ``RELEASE.metalink`` next to the file.
        checksum: verify the MD5 when one is known.
        retries: how often a dropped connection is resumed within this run.
        backoff: seconds before the first retry (doubling, at most 30 s).

    Raises:
        UserError: network failure (the ``.part`` file is kept for resuming), size or
            checksum mismatch (the corrupt ``.part`` is removed).
    """
    if url is None:
        if source not in SOURCES:
            raise UserError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)} or give --url")
        url = SOURCES[source]
    name = Path(urllib.parse.urlparse(url).path).name or f"{source}.fasta.gz"
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    dest, part = out / name, out / (name + ".part")

    meta_size = None
    if checksum and md5 is None:
        doc = _fetch_small(metalink_url(url), timeout)
        if doc is not None:
            meta_size, md5 = parse_metalink(doc, name)
    md5 = md5.lower() if md5 else None

    if dest.exists():
        size = dest.stat().st_size
        if meta_size is not None and size != meta_size:
            raise UserError(
                f"{dest}: exists with {size:,} bytes but the release file has {meta_size:,}; "
                "remove it (an older release?) and run download again"
            )
        return DownloadResult(dest, size, None, size, already_present=True)

    start = part.stat().st_size if part.exists() else 0
    resumed_from = start
    hasher = _md5_of(part) if (start and md5) else hashlib.md5()
    prog = _Progress(name, progress)
    session = 0
    total: int | None = meta_size
    attempt = 0
    try:
        while True:
            try:
                try:
                    resp = _open(url, start, timeout)
                except urllib.error.HTTPError as err:
                    if err.code == 416 and start and total is not None and start == total:
                        break  # the .part is already complete
                    if err.code == 416:  # our .part does not fit the file on the server: restart
                        start, hasher = 0, hashlib.md5()
                        part.unlink(missing_ok=True)
                        continue
                    raise
                with resp:
                    if start and resp.status != 206:  # server ignored Range: start over
                        start, hasher = 0, hashlib.md5()
                    total = _total_from(resp, start) or total
                    mode = "ab" if start else "wb"
                    with open(part, mode) as fh:
                        while True:
                            try:
                                chunk = resp.read(CHUNK)
                            except (OSError, urllib.error.URLError) as err:  # includes IncompleteRead
                                raise _Interrupted(str(err)) from err
                            if not chunk:
                                break
                            fh.write(chunk)
                            hasher.update(chunk)
                            start += len(chunk)
                            session += len(chunk)
                            prog.update(start, total, session)
                if total is not None and start < total:
                    raise _Interrupted(f"connection closed after {start:,} of {total:,} bytes")
                break
            except (_Interrupted, urllib.error.URLError, ConnectionError, TimeoutError) as err:
                if isinstance(err, urllib.error.HTTPError) and err.code < 500:
                    raise UserError(f"{url}: HTTP {err.code} {err.reason}") from None
                attempt += 1
                if attempt > retries:
                    raise UserError(
                        f"{url}: download interrupted at {start:,} bytes ({err}); "
                        f"{part} is kept: run the same command again to resume"
                    ) from None
                time.sleep(min(backoff * 2.0 ** (attempt - 1), 30.0))
    finally:
        prog.update(start, total, session, final=True)
        prog.close()

    size = part.stat().st_size
    if total is not None and size != total:
        part.unlink(missing_ok=True)
        raise UserError(
            f"{url}: got {size:,} bytes, the server announced {total:,}; removed {part}, try again"
        )
    digest = None
    if checksum and md5:
        digest = hasher.hexdigest()
        if digest != md5:
            part.unlink(missing_ok=True)
            raise UserError(
                f"{url}: MD5 mismatch (got {digest}, release says {md5}); removed {part}, try again"
            )
    replace_file(part, dest)  # flushed first: a crash right after never leaves a short FILE
    return DownloadResult(dest, size, digest, resumed_from)
