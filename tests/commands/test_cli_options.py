"""User-facing CLI options without a test elsewhere, each checked against an independent computation.

* ``analyze --protein / --null marginal / --include-self``: the saved mass matrices are recomputed by
  brute force from ``model.attention_maps`` and the log odds by hand (plain numpy);
* ``convert --num-features``: projection shape and an unchanged state dict, then ``evaluate``;
* ``download --no-checksum``: a local 127.0.0.1 server whose metalink MD5 is wrong;
* ``prepare --workers``: the process pool gives the same bytes as one process and as one input file;
* ``position: learned``: ``evaluate`` windows long sequences (loss recomputed window by window),
  ``analyze`` crops to the learned window instead of crashing.

Tiny random models (seconds on 2 CPU cores).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import http.server
import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from protein_lm.checkpoint import read_checkpoint, save_weights, weights_payload
from protein_lm.cli import main
from protein_lm.data.tokenizer import CLS_ID, EOS_ID, STANDARD_AA, TOKEN_TO_ID
from protein_lm.model import ModelConfig, ProteinLM

_TINY = dict(dim=16, depth=2, heads=2, ff_dim=32, num_features=16, favor_backend="torch", feature_seed=0)
# Record ids with characters a file name cannot hold; one X (not a standard residue) in the second.
PROTEINS = {
    "sp|P1|ONE": "MKVLAEDFGYWRTSPQNHICDDEKFY",
    "sp|P2|TWO": "ACDEFGHIKLXMNPQRSTVWY",
    "P3": "WWKKDDEEFFYYLLIIVV",
}


def _fasta(path: Path, proteins: dict[str, str]) -> Path:
    path.write_text("".join(f">{rid} some description\n{seq}\n" for rid, seq in proteins.items()))
    return path


def _model(seed: int = 0, **overrides) -> ProteinLM:
    torch.manual_seed(seed)
    return ProteinLM(ModelConfig(**{**_TINY, **overrides})).eval()


def _save(model: ProteinLM, path: Path, objective: str = "mlm") -> Path:
    save_weights(weights_payload(model.config, objective, model.state_dict()), path)
    return path


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _analyze(capsys, ckpt: Path, fasta: Path, out: Path, *extra) -> tuple[int, str, str]:
    return _cli(capsys, "analyze", "--checkpoint", ckpt, "--fasta", fasta, "--out", out, *extra)


def _framed(seq: str) -> torch.Tensor:
    """(1, L + 2) ``<cls> residues <eos>``, built here from the token table (not analysis.frame)."""
    return torch.tensor([[CLS_ID, *(TOKEN_TO_ID[c] for c in seq), EOS_ID]])


def _read_matrix(path: Path) -> np.ndarray:
    rows = list(csv.reader(path.open()))
    assert rows[0][1:] == list(STANDARD_AA) and [r[0] for r in rows[1:]] == list(STANDARD_AA)
    return np.array([[float(v) for v in r[1:]] for r in rows[1:]])


def _brute_force_mass(model: ProteinLM, seqs: list[str], include_self: bool) -> tuple[np.ndarray, np.ndarray]:
    """(layers, heads, 20, 20) attention mass and the (20, 20) uniform-attention mass, by explicit loops."""
    cfg = model.config
    mass = np.zeros((cfg.depth, cfg.heads, 20, 20))
    uniform = np.zeros((20, 20))
    for seq in seqs:
        tokens = "^" + seq + "$"  # stand-ins for <cls>/<eos>: never a standard residue
        maps = {layer: a[0].double().numpy() for layer, a in model.attention_maps(_framed(seq))}
        for i, a in enumerate(tokens):
            for j, b in enumerate(tokens):
                if a not in STANDARD_AA or b not in STANDARD_AA or (i == j and not include_self):
                    continue
                ia, ib = STANDARD_AA.index(a), STANDARD_AA.index(b)
                uniform[ia, ib] += 1.0 / len(tokens)  # uniform attention over all L + 2 positions
                for layer, m in maps.items():
                    mass[layer, :, ia, ib] += m[:, i, j]
    return mass, uniform


def _log_odds(mass: np.ndarray, expected_mass: np.ndarray | None, pseudocount: float) -> np.ndarray:
    """docs/analysis.md §3 written out: symmetrise, pseudocount, normalise, log2(P / Q)."""

    def joint(m: np.ndarray) -> np.ndarray:
        sym = (m + m.T) / 2
        sym = sym + pseudocount * sym.sum() / 400
        return sym / sym.sum()

    p = joint(mass)
    if expected_mass is None:  # marginal null: Q = p p^T
        marg = p.sum(axis=1)
        q = np.outer(marg, marg)
    else:
        q = joint(expected_mass)
    return np.log2(p / q)


# --------------------------------------------------------------------------- analyze


@pytest.fixture(scope="module")
def analyze_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analyze")
    model = _model()
    return model, _save(model, tmp / "m.pt"), _fasta(tmp / "p.fa", PROTEINS)


def test_analyze_protein_picks_the_named_record(analyze_setup, tmp_path, capsys):
    _, ckpt, fasta = analyze_setup
    # The named record is outside the analysed ones (--max-sequences 1): it is looked up in the file.
    code, _, err = _analyze(
        capsys, ckpt, fasta, tmp_path / "a", "--max-sequences", 1, "--protein", "sp|P2|TWO"
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["attention_map_protein"] == "sp|P2|TWO" and summary["num_sequences"] == 1
    figure = tmp_path / "a" / "attention_sp_P2_TWO.png"
    assert summary["attention_map_file"] == figure.name and figure.read_bytes()[:4] == b"\x89PNG"
    # Default: the first analysed protein; its figure is another picture.
    code, _, err = _analyze(capsys, ckpt, fasta, tmp_path / "b", "--max-sequences", 1)
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["attention_map_protein"] == "sp|P1|ONE"
    other = tmp_path / "b" / "attention_sp_P1_ONE.png"
    assert other.read_bytes() != figure.read_bytes()
    assert not list((tmp_path / "b").glob("attention_sp_P2*"))


def test_analyze_unknown_protein_is_a_one_line_error_before_the_work(analyze_setup, tmp_path, capsys):
    _, ckpt, fasta = analyze_setup
    out = tmp_path / "a"
    code, _, err = _analyze(capsys, ckpt, fasta, out, "--protein", "P9")
    lines = err.strip().splitlines()
    assert (
        code == 2 and lines[-1] == f"protein-lm analyze: error: {fasta}: no record with id 'P9' (--protein)"
    )
    assert "Traceback" not in err and not out.exists() and not list(tmp_path.iterdir())
    assert not any("sequences," in line for line in lines)  # no attention was accumulated first


@pytest.mark.parametrize("include_self", [False, True])
def test_analyze_mass_matches_brute_force(analyze_setup, tmp_path, capsys, include_self):
    model, ckpt, fasta = analyze_setup
    flag = ["--include-self"] if include_self else []
    code, _, err = _analyze(capsys, ckpt, fasta, tmp_path / "a", "--max-sequences", 2, *flag)
    assert code == 0, err
    out = tmp_path / "a"
    mass, uniform = _brute_force_mass(model, list(PROTEINS.values())[:2], include_self)
    np.testing.assert_allclose(np.load(out / "mass.npy"), mass, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(out / "uniform_mass.npy"), uniform, rtol=1e-12, atol=1e-12)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exclude_self"] is (not include_self)
    # Self-attention only ever lands on the diagonal, and there it is clearly non-zero.
    other, _ = _brute_force_mass(model, list(PROTEINS.values())[:2], not include_self)
    diff = mass - other
    off = ~np.eye(20, dtype=bool)
    assert np.abs(diff[..., off]).max() < 1e-9 and np.abs(np.diagonal(diff, axis1=-2, axis2=-1)).sum() > 0.1


def test_analyze_null_marginal_vs_uniform_log_odds_by_hand(analyze_setup, tmp_path, capsys):
    _, ckpt, fasta = analyze_setup
    runs = {}
    for null in ("uniform", "marginal"):
        flag = [] if null == "uniform" else ["--null", "marginal"]
        code, _, err = _analyze(capsys, ckpt, fasta, tmp_path / null, "--pseudocount", 0.01, *flag)
        assert code == 0, err
        runs[null] = tmp_path / null
    summaries = {k: json.loads((d / "summary.json").read_text()) for k, d in runs.items()}
    assert summaries["uniform"]["null"] == "uniform" and summaries["marginal"]["null"] == "marginal"
    mass = np.load(runs["uniform"] / "mass.npy")
    np.testing.assert_array_equal(mass, np.load(runs["marginal"] / "mass.npy"))  # the null is not the mass
    uniform = np.load(runs["uniform"] / "uniform_mass.npy")
    d, e = STANDARD_AA.index("D"), STANDARD_AA.index("E")
    for null, expected in (("uniform", uniform), ("marginal", None)):
        s = summaries[null]
        best = mass[s["best_layer"], s["best_head"]]
        by_hand = _log_odds(best, expected, 0.01)
        csv_best = _read_matrix(runs[null] / "logodds_best_head.csv")
        assert csv_best[d, e] == pytest.approx(by_hand[d, e], abs=2e-6)
        np.testing.assert_allclose(csv_best, by_hand, atol=2e-6)
    # The two nulls give different matrices for the same head.
    s = summaries["uniform"]
    head = mass[s["best_layer"], s["best_head"]]
    assert np.abs(_log_odds(head, uniform, 0.01) - _log_odds(head, None, 0.01)).max() > 0.05


# --------------------------------------------------------------------------- convert


def test_convert_num_features_changes_only_the_projection(tmp_path, capsys):
    src = _model(attention="exact", num_features=16)
    ckpt = _save(src, tmp_path / "exact.pt")
    out = tmp_path / "perf.pt"
    code, stdout, err = _cli(
        capsys,
        "convert",
        "--checkpoint",
        ckpt,
        "--attention",
        "performer-softmax",
        "--num-features",
        24,
        "--seed",
        3,
        "--out",
        out,
    )
    assert code == 0, err
    assert "performer-softmax" in stdout
    conv = read_checkpoint(out)
    assert conv["config"]["num_features"] == 24 and conv["config"]["attention"] == "performer-softmax"
    new, old = conv["state_dict"], src.state_dict()
    projections = [k for k in new if k.endswith(".projection")]
    head_dim = _TINY["dim"] // _TINY["heads"]
    assert len(projections) == _TINY["depth"]
    assert all(tuple(new[k].shape) == (24, head_dim) for k in projections)
    assert all(".kernel." in k for k in set(new) ^ set(old))  # only kernel buffers differ in name
    for k in set(new) & set(old):
        assert torch.equal(new[k], old[k]), k
    # evaluate runs on it
    fasta = _fasta(tmp_path / "p.fa", PROTEINS)
    code, stdout, err = _cli(
        capsys, "evaluate", "--checkpoint", out, "--fasta", fasta, "--quiet", "--device", "cpu"
    )
    assert code == 0, err
    result = json.loads(stdout)
    assert result["attention"] == "performer-softmax" and math.isfinite(result["loss"])
    assert result["num_tokens"] > 0
    # A non-positive feature count is a one-line error, not a traceback.
    code, _, err = _cli(
        capsys,
        "convert",
        "--checkpoint",
        ckpt,
        "--attention",
        "performer-relu",
        "--num-features",
        0,
        "--out",
        tmp_path / "bad.pt",
    )
    assert code == 2 and err.strip() == "protein-lm convert: error: --num-features must be at least 1, got 0"
    assert not (tmp_path / "bad.pt").exists()


# --------------------------------------------------------------------------- download

PAYLOAD = bytes(range(251)) * 997  # ~250 kB
FILE = "/pub/uniprot_sprot.fasta.gz"
WRONG_MD5 = hashlib.md5(PAYLOAD + b"x").hexdigest()
METALINK = (
    '<metalink xmlns="urn:ietf:params:xml:ns:metalink"><file name="uniprot_sprot.fasta.gz">'
    f'<size>{len(PAYLOAD)}</size><hash type="md5">{WRONG_MD5}</hash></file></metalink>'
)


@pytest.fixture
def mirror():
    """127.0.0.1 server: the payload and a RELEASE.metalink whose MD5 does not match it."""
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            requests.append(self.path)
            body = {FILE: PAYLOAD, "/pub/RELEASE.metalink": METALINK.encode()}.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}{FILE}", requests
    httpd.shutdown()
    httpd.server_close()


def test_download_no_checksum_accepts_a_metalink_mismatch(mirror, tmp_path, capsys):
    url, requests = mirror
    base = ["download", "swissprot", "--url", url, "-q", "--retries", 0]
    code, _, err = _cli(capsys, *base, "--out", tmp_path / "checked")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"MD5 mismatch (got {hashlib.md5(PAYLOAD).hexdigest()}, release says {WRONG_MD5})" in err
    assert list((tmp_path / "checked").iterdir()) == []  # neither the file nor a .part is left
    assert "/pub/RELEASE.metalink" in requests

    requests.clear()
    code, out, err = _cli(capsys, *base, "--out", tmp_path / "unchecked", "--no-checksum")
    assert code == 0, err
    dest = tmp_path / "unchecked" / "uniprot_sprot.fasta.gz"
    assert dest.read_bytes() == PAYLOAD and sorted(p.name for p in dest.parent.iterdir()) == [dest.name]
    assert f"{len(PAYLOAD):,} bytes" in out and "MD5 not checked (--no-checksum)" in out
    assert requests == [FILE]  # the metalink is not even fetched


# --------------------------------------------------------------------------- prepare

CACHE_FILES = ("tokens.u8", "offsets.npy", "ids.txt")


def _manifest(cache: Path) -> dict:
    data = json.loads((cache / "manifest.json").read_text())
    data.pop("created")  # the only timing field
    return data


def test_prepare_workers_are_byte_identical(sample_fasta, tmp_path, capsys):
    # --workers only parallelises over input files: split the shipped sample into 3 (gz, plain, gz).
    records = gzip.decompress(sample_fasta.read_bytes()).split(b"\n>")
    cut = [0, 1500, 2600, len(records)]
    parts = []
    for k in range(3):
        chunk = b"\n>".join(records[cut[k] : cut[k + 1]])
        chunk = (chunk if k == 0 else b">" + chunk).rstrip(b"\n") + b"\n"
        name = tmp_path / (f"part{k}.fasta" + ("" if k == 1 else ".gz"))
        name.write_bytes(chunk if k == 1 else gzip.compress(chunk))
        parts.append(name)
    caches = {}
    for label, inputs, workers in (("one", parts, 1), ("two", parts, 2), ("whole", [sample_fasta], 1)):
        caches[label] = tmp_path / f"cache_{label}"
        code, _, err = _cli(capsys, "prepare", *inputs, "--out", caches[label], "--workers", workers, "-q")
        assert code == 0, err
    for name in CACHE_FILES:
        one = (caches["one"] / name).read_bytes()
        assert (caches["two"] / name).read_bytes() == one, name
        assert (caches["whole"] / name).read_bytes() == one, name  # independent: no split, no pool
    assert _manifest(caches["two"]) == _manifest(caches["one"])
    assert _manifest(caches["one"])["num_sequences"] == 4000
    code, _, err = _cli(capsys, "prepare", sample_fasta, "--out", tmp_path / "c0", "--workers", 0, "-q")
    assert code == 2 and err.strip() == "protein-lm prepare: error: --workers must be at least 1, got 0"


# --------------------------------------------------------------------------- learned positions

LONG = {"long": "MKVLAEDFGYWRTSPQNHIC" * 3, "short": "ACDEFGHIKL"}  # 60 and 10 residues


def test_evaluate_learned_positions_scores_windows(tmp_path, capsys):
    model = _model(position="learned", max_length=24, causal=True)
    ckpt = _save(model, tmp_path / "learned.pt", objective="causal")
    fasta = _fasta(tmp_path / "p.fa", LONG)
    code, stdout, err = _cli(
        capsys, "evaluate", "--checkpoint", ckpt, "--fasta", fasta, "--quiet", "--device", "cpu"
    )
    assert code == 0, err
    result = json.loads(stdout)
    # Independent: consecutive windows of max_length - 2 = 22 residues, each <cls> w <eos>, scored alone.
    losses, correct = [], 0
    for seq in LONG.values():
        for start in range(0, len(seq), 22):
            ids = _framed(seq[start : start + 22])
            with torch.no_grad():
                logits = model(ids).logits[0, :-1]
            target = ids[0, 1:]
            losses.append(torch.nn.functional.cross_entropy(logits, target, reduction="none"))
            correct += int((logits.argmax(-1) == target).sum())
    losses = torch.cat(losses)
    assert result["max_length"] == 24 and result["num_tokens"] == len(losses) == 23 + 23 + 17 + 11
    assert result["loss"] == pytest.approx(float(losses.mean()), rel=1e-5)
    assert result["accuracy"] == pytest.approx(correct / len(losses))
    assert all(math.isfinite(result[k]) for k in ("loss", "accuracy", "perplexity"))


def test_analyze_learned_positions_crops_to_the_window(tmp_path, capsys):
    model = _model(position="learned", max_length=24)
    ckpt = _save(model, tmp_path / "learned.pt")
    fasta = _fasta(tmp_path / "p.fa", LONG)
    out = tmp_path / "a"
    code, _, err = _analyze(capsys, ckpt, fasta, out, "--protein", "long")
    assert code == 0, err
    assert "cropping sequences to 22 residues" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_residues"] == 22 + 10 and summary["max_length"] == 22
    mass, uniform = _brute_force_mass(model, [s[:22] for s in LONG.values()], include_self=False)
    np.testing.assert_allclose(np.load(out / "mass.npy"), mass, rtol=1e-5, atol=1e-6)
    # uniform null in closed form: n residues of n + 2 positions, self left out -> n (n - 1) / (n + 2)
    assert np.load(out / "uniform_mass.npy").sum() == pytest.approx(22 * 21 / 24 + 10 * 9 / 12)
    assert np.isfinite(_read_matrix(out / "logodds_best_head.csv")).all()
    assert (out / "attention_long.png").is_file()
