"""bench/ holds code only; what it measured lives in results/, and every results/ path the docs cite exists.

Paths in code (inline `...` spans and fenced blocks) are read from the repository root, as the bench
commands are run; markdown links are read from the linking file, as a renderer does. So
docs/results.md's `![...](results/x.png)` points at docs/results/, not at results/.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Code, configs and notes that may live next to the benchmarks; a measurement (json, csv, png, npy,
# log, ...) does not.
CODE_SUFFIXES = {".py", ".sh", ".yaml", ".yml", ".md"}
DOCS = sorted(REPO.glob("docs/*.md")) + [REPO / "README.md", REPO / "results" / "README.md"]
DOCS += sorted(p for p in (REPO / "bench").rglob("*.md"))

FENCED = re.compile(r"^```.*?^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
# results/... not preceded by a path character (docs/results/... is another folder)
RESULTS_PATH = re.compile(r"(?<![\w./-])results/[\w.*<>/-]*")


def _tracked(folder: str) -> list[str]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", folder], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_bench_holds_no_measurements():
    data = [p for p in _tracked("bench") if Path(p).suffix not in CODE_SUFFIXES]
    assert data == [], f"move measurements to results/ (results/README.md): {data}"


def test_bench_holds_code_at_all():
    # guards the test above against an empty listing (wrong folder, git failing quietly)
    assert "bench/attention.py" in _tracked("bench")


def cited_results_paths(doc: Path) -> list[tuple[str, Path]]:
    return cited_in(doc.read_text(), doc.parent)


def cited_in(text: str, folder: Path) -> list[tuple[str, Path]]:
    """(as written, resolved) for every path into REPO/results that `text`, a file in `folder`, names."""
    code = FENCED.findall(text)
    prose = FENCED.sub("", text)
    code += INLINE.findall(prose)
    found = [(m, REPO / m) for span in code for m in RESULTS_PATH.findall(span)]
    for target in LINK.findall(INLINE.sub("", prose)):
        if "://" in target or target.startswith("#"):
            continue
        path = (folder / target.split("#")[0]).resolve()
        if path.is_relative_to(REPO / "results"):
            found.append((target, path))
    return found


def _exists(path: Path) -> bool:
    pattern = re.sub(r"<[^>]*>", "*", str(path.relative_to(REPO))).rstrip("/.,;:")
    return any(REPO.glob(pattern)) if "*" in pattern else (REPO / pattern).exists()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_cited_results_path_exists(doc):
    missing = [written for written, path in cited_results_paths(doc) if not _exists(path)]
    assert missing == [], f"{doc.relative_to(REPO)} cites missing results: {missing}"


def test_the_docs_cite_results():
    # the checker finds the paths it is meant to check: each kind of citation once at least
    cited = {written for doc in DOCS for written, _ in cited_results_paths(doc)}
    assert "results/h200_throughput/attention_h200.json" in cited  # inline code, docs/benchmarks.md
    assert "../results/attention_h100.png" in cited  # markdown image link, docs/benchmarks.md
    assert "results/swissprot_h100_bid2500" in cited  # fenced block, docs/results.md
    assert not any("learning_curves" in c for c in cited)  # docs/results/ figures are not results/


def test_checker_reports_a_missing_file():
    text = "`results/no_such_file.json`, ![x](../results/attention_h100.png), [y](results/z.png)\n"
    cited = dict(cited_in(text, REPO / "docs"))
    assert list(cited) == ["results/no_such_file.json", "../results/attention_h100.png"]
    assert not _exists(cited["results/no_such_file.json"]) and _exists(cited["../results/attention_h100.png"])


def test_no_file_points_into_bench_results():
    needles = ("bench/results", '"bench" / "results"', '\\"bench\\" / \\"results\\"')
    this_file = Path(__file__).resolve().relative_to(REPO).as_posix()
    stale = []
    for name in _tracked("."):
        # results/ keeps each run's record as it was written, output path of that time included
        if name == this_file or name.startswith("results/"):
            continue
        if Path(name).suffix in {".py", ".sh", ".md", ".ipynb", ".yaml", ".yml", ".toml"} or name in {
            "Makefile", ".gitignore"
        }:
            text = (REPO / name).read_text(errors="replace")
            stale += [f"{name}: {n}" for n in needles if n in text]
    assert stale == []
