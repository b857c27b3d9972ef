"""`protein-lm download {swissprot,uniref50,uniref90} --out DIR`: a UniProt release file.

Resumable: re-running after an interruption continues the ``.part`` file (HTTP Range).
Checked: size against the server's Content-Length and MD5 against UniProt's
``RELEASE.metalink``. Standard library only.
"""

from __future__ import annotations

import argparse

from protein_lm.download import SOURCES, download
from protein_lm.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", choices=sorted(SOURCES), help="which UniProt release file")
    parser.add_argument("--out", "-o", required=True, help="directory to download into")
    parser.add_argument("--url", help="download from this URL instead (a mirror); default: the UniProt FTP")
    parser.add_argument("--md5", help="expected MD5 (default: from RELEASE.metalink next to the file)")
    parser.add_argument("--no-checksum", action="store_true", help="skip the MD5 check")
    parser.add_argument("--retries", type=int, default=5, help="resume a dropped connection this often")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    if args.retries < 0:
        raise UserError(f"--retries must be >= 0, got {args.retries}")
    res = download(
        args.source,
        args.out,
        url=args.url,
        md5=args.md5,
        checksum=not args.no_checksum,
        progress=not args.quiet,
        retries=args.retries,
    )
    if res.already_present:
        print(f"{res.path}: already downloaded ({res.size:,} bytes)")
        return 0
    resumed = f", resumed at {res.resumed_from:,} bytes" if res.resumed_from else ""
    if res.md5:
        check = f"MD5 {res.md5} verified"
    elif args.no_checksum:
        check = "MD5 not checked (--no-checksum), size checked"
    else:
        check = "no published checksum, size checked"
    print(f"{res.path}: {res.size:,} bytes{resumed}; {check}")
    print(f"next: protein-lm prepare {res.path} --out DIR")
    return 0
