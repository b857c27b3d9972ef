"""`protein-lm download` against a local HTTP server on 127.0.0.1 (no other network)."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from protein_lm.cli import main
from protein_lm.download import download, parse_metalink
from protein_lm.errors import UserError

PAYLOAD = bytes(range(256)) * 4000 + b"tail"  # ~1 MB, not a multiple of the chunk size
MD5 = hashlib.md5(PAYLOAD).hexdigest()
FILE = "/uniref/uniref50/uniref50.fasta.gz"

METALINK = f"""<?xml version="1.0" encoding="UTF-8"?>
<metalink version="3.0" xmlns="http://www.metalinker.org/">
  <files>
    <file name="uniref50.xml.gz"><size>12</size>
      <verification><hash type="md5">00000000000000000000000000000000</hash></verification></file>
    <file name="uniref50.fasta.gz"><size>{len(PAYLOAD)}</size>
      <verification><hash type="md5">{MD5}</hash></verification></file>
  </files>
</metalink>
"""


class Server:
    """Serves PAYLOAD with Range support; can cut the first N responses short."""

    def __init__(self):
        self.requests: list[dict] = []
        self.cut_after: list[int] = []  # per upcoming GET: close after this many body bytes
        self.ignore_range = False
        self.payload = PAYLOAD
        self.metalink: str | None = METALINK
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                server.requests.append({"path": self.path, "range": self.headers.get("Range")})
                if self.path.endswith("RELEASE.metalink"):
                    if server.metalink is None:
                        self.send_error(404)
                        return
                    body = server.metalink.encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if self.path != FILE:
                    self.send_error(404)
                    return
                data, start = server.payload, 0
                rng = self.headers.get("Range")
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_after:
                    n = server.cut_after.pop(0)
                    self.wfile.write(body[:n])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{FILE}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def get(server, out: Path, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("backoff", 0.0)
    kw.setdefault("timeout", 10.0)
    return download("uniref50", out, url=server.url, **kw)


def test_parse_metalink():
    assert parse_metalink(METALINK, "uniref50.fasta.gz") == (len(PAYLOAD), MD5)
    assert parse_metalink(METALINK, "missing.gz") == (None, None)
    assert parse_metalink("not xml", "x") == (None, None)
    v4 = (
        '<metalink xmlns="urn:ietf:params:xml:ns:metalink"><file name="a.gz"><size>3</size>'
        '<hash type="md5">ABC</hash></file></metalink>'
    )
    assert parse_metalink(v4, "a.gz") == (3, "abc")


def test_full_download_verified(server, tmp_path):
    res = get(server, tmp_path)
    assert res.path == tmp_path / "uniref50.fasta.gz"
    assert res.path.read_bytes() == PAYLOAD and res.md5 == MD5 and res.resumed_from == 0
    assert not (tmp_path / "uniref50.fasta.gz.part").exists()
    again = get(server, tmp_path)
    assert again.already_present
    assert len([r for r in server.requests if r["path"] == FILE]) == 1  # not fetched twice


def test_dropped_connection_resumes_with_range(server, tmp_path):
    server.cut_after = [300_000, 200_000]  # two broken responses, then a good one
    res = get(server, tmp_path)
    assert res.path.read_bytes() == PAYLOAD and res.md5 == MD5
    ranges = [r["range"] for r in server.requests if r["path"] == FILE]
    assert ranges == [None, "bytes=300000-", "bytes=500000-"]


def test_interrupted_run_resumes_next_run(server, tmp_path, capsys):
    server.cut_after = [300_000] * 3  # the first run gives up after 2 retries
    with pytest.raises(UserError, match="run the same command again to resume"):
        get(server, tmp_path, retries=2)
    part = tmp_path / "uniref50.fasta.gz.part"
    assert part.stat().st_size == 900_000 and part.read_bytes() == PAYLOAD[:900_000]
    assert not (tmp_path / "uniref50.fasta.gz").exists()
    have = part.stat().st_size
    server.requests.clear()
    # Second run through the CLI: continues from the .part with a Range request.
    code = main(["download", "uniref50", "--out", str(tmp_path), "--url", server.url, "-q"])
    assert code == 0
    assert (tmp_path / "uniref50.fasta.gz").read_bytes() == PAYLOAD
    assert [r["range"] for r in server.requests if r["path"] == FILE] == [f"bytes={have}-"]
    out = capsys.readouterr().out
    assert f"resumed at {have:,} bytes" in out and f"MD5 {MD5} verified" in out


def test_server_ignoring_range_restarts(server, tmp_path):
    (tmp_path / "uniref50.fasta.gz.part").write_bytes(PAYLOAD[:1000])
    server.ignore_range = True
    res = get(server, tmp_path)
    assert res.path.read_bytes() == PAYLOAD and res.md5 == MD5


def test_complete_part_file(server, tmp_path):
    (tmp_path / "uniref50.fasta.gz.part").write_bytes(PAYLOAD)
    res = get(server, tmp_path)
    assert res.path.read_bytes() == PAYLOAD and res.md5 == MD5


def test_checksum_mismatch(server, tmp_path, capsys):
    server.metalink = METALINK.replace(MD5, "f" * 32)
    code = main(["download", "uniref50", "--out", str(tmp_path), "--url", server.url, "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "MD5 mismatch" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_no_metalink_size_check_only(server, tmp_path):
    server.metalink = None
    res = get(server, tmp_path)
    assert res.path.read_bytes() == PAYLOAD and res.md5 is None
    res2 = get(server, tmp_path / "b", md5=MD5)  # an explicit MD5 is still checked
    assert res2.md5 == MD5


def test_http_error_is_one_line(server, tmp_path, capsys):
    bad = server.url.replace("uniref50.fasta.gz", "nope.fasta.gz")
    code = main(["download", "uniref50", "--out", str(tmp_path), "--url", bad, "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "HTTP 404" in err and "Traceback" not in err
