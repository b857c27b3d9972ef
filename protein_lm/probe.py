"""A downstream probe: do the embeddings know secondary structure? (FLIP, 3 states, Q3.)

The task: FLIP's secondary-structure ``sampled`` split (Dallago et al. 2021; labels from
NetSurfP-2.0, Klausen et al. 2019): per residue one of ``H`` (helix), ``E`` (strand), ``C`` (coil).
The split archive holds three FASTA files with the same ids: ``sequences.fasta``, ``sampled.fasta``
(labels; headers carry ``SET=train|test`` and ``VALIDATION=True|False``) and ``mask.fasta`` (1 where
the residue was resolved in the structure). Only resolved residues are trained on and scored.

The probe: frozen per-residue features -> a small head trained on the train chains (the
``VALIDATION=True`` ones pick the head's regularisation / stopping point) -> Q3 = the fraction of
resolved test residues whose state is predicted right. Features compared:

* ``model``: the checkpoint's per-residue embeddings at one layer (:mod:`protein_lm.embeddings`);
* ``random``: the same architecture with seeded random weights (what the architecture alone gives);
* ``onehot``: the residue's identity only (no context; the floor any contextual model must beat).

Heads: ``linear`` (multinomial logistic regression, full-batch L-BFGS, L2 chosen on validation) and
``mlp`` (one hidden layer, Adam, best epoch on validation).
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from protein_lm.data.tokenizer import VOCAB_SIZE, encode_residues
from protein_lm.errors import UserError

STATES = "HEC"
_FILES = ("sequences.fasta", "sampled.fasta", "mask.fasta")


@dataclass
class Chain:
    """One labelled chain: residue ids, state ids (0 H, 1 E, 2 C), resolved mask, and its split."""

    id: str
    tokens: np.ndarray  # (n,) uint8
    states: np.ndarray  # (n,) int64
    resolved: np.ndarray  # (n,) bool
    split: str  # "train", "val" or "test"


def _fasta_entries(text: str) -> list[tuple[str, str]]:
    """(header, body) pairs of a small FASTA text (headers without '>')."""
    entries = []
    for block in text.split(">")[1:]:
        header, _, body = block.partition("\n")
        entries.append((header.strip(), "".join(body.split())))
    return entries


def _read_split_files(path: Path) -> dict[str, str]:
    """The three split files' texts, from the FLIP zip or a directory holding them."""
    texts = {}
    if path.is_dir():
        for name in _FILES:
            found = list(path.rglob(name))
            if not found:
                raise UserError(f"--data {path}: no {name} inside")
            texts[name] = found[0].read_text()
        return texts
    if not path.is_file():
        raise UserError(f"--data {path}: no such file or directory")
    try:
        with zipfile.ZipFile(path) as zf:
            for name in _FILES:
                member = next((m for m in zf.namelist() if m.endswith("/" + name) or m == name), None)
                if member is None:
                    raise UserError(f"--data {path}: no {name} in the archive")
                texts[name] = io.TextIOWrapper(zf.open(member), encoding="ascii").read()
    except zipfile.BadZipFile:
        raise UserError(f"--data {path}: not a zip archive (expected FLIP's secondary_structure_splits.zip)") from None
    return texts


def load_flip_secondary_structure(path: str | os.PathLike) -> list[Chain]:
    """The chains of FLIP's secondary-structure ``sampled`` split, in file order.

    Raises:
        UserError: a missing file, or a chain whose labels / mask do not match its sequence.
    """
    path = Path(path)
    texts = _read_split_files(path)
    sequences = dict(_fasta_entries(texts["sequences.fasta"]))
    masks = dict(_fasta_entries(texts["mask.fasta"]))
    chains = []
    for header, labels in _fasta_entries(texts["sampled.fasta"]):
        cid, *attrs = header.split()
        fields = dict(a.split("=", 1) for a in attrs if "=" in a)
        seq, mask = sequences.get(cid), masks.get(cid)
        if seq is None or mask is None:
            raise UserError(f"{path}: chain {cid} has labels but no sequence or mask")
        if not len(seq) == len(labels) == len(mask):
            raise UserError(f"{path}: chain {cid}: sequence, labels and mask lengths differ "
                            f"({len(seq)}, {len(labels)}, {len(mask)})")
        bad = set(labels) - set(STATES)
        if bad:
            raise UserError(f"{path}: chain {cid}: labels other than H/E/C: {''.join(sorted(bad))}")
        split = fields.get("SET", "train")
        if split == "train" and fields.get("VALIDATION") == "True":
            split = "val"
        chains.append(Chain(
            id=cid,
            tokens=encode_residues(seq),
            states=np.array([STATES.index(c) for c in labels], dtype=np.int64),
            resolved=np.frombuffer(mask.encode(), dtype=np.uint8) == ord("1"),
            split=split,
        ))
    return chains


def subsample(chains: Sequence[Chain], split: str, limit: int | None, seed: int) -> list[Chain]:
    """The chains of ``split``, at most ``limit`` of them drawn at random (seeded), in file order."""
    chosen = [c for c in chains if c.split == split]
    if limit is not None and len(chosen) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(chosen), size=limit, replace=False))
        chosen = [chosen[i] for i in keep]
    return chosen


def onehot_features(chain: Chain) -> Tensor:
    """(n, 33) one-hot residue identities."""
    return torch.nn.functional.one_hot(torch.from_numpy(chain.tokens.astype(np.int64)), VOCAB_SIZE).float()


def stack(chains: Sequence[Chain], features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Features and states of the resolved residues of ``chains``: (N, F) float32, (N,) int64."""
    xs, ys = [], []
    for chain, feat in zip(chains, features, strict=True):
        keep = torch.from_numpy(chain.resolved)
        xs.append(feat[keep])
        ys.append(torch.from_numpy(chain.states)[keep])
    return torch.cat(xs).float(), torch.cat(ys)


def q3(predicted: Tensor, states: Tensor) -> float:
    """Fraction of residues whose predicted state is the labelled one."""
    return float((predicted == states).double().mean())


@dataclass
class HeadResult:
    q3_val: float
    q3_test: float
    choice: str  # the regularisation or epoch picked on validation


def _standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    mean, std = train.mean(0), train.std(0).clamp(min=1e-6)
    return [(x - mean) / std for x in (train, *others)]


def fit_logistic(x: Tensor, y: Tensor, l2: float, iterations: int = 100) -> nn.Linear:
    """Multinomial logistic regression ``softmax(x W^T + b)`` minimising CE + ``l2 * |W|^2`` (L-BFGS)."""
    head = nn.Linear(x.shape[1], len(STATES))
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=iterations, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def train_linear(x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, x_test: Tensor, y_test: Tensor,
                 l2_values: Sequence[float] = (1e-4, 1e-3, 1e-2)) -> HeadResult:
    """A logistic-regression head for each L2 weight; the one best on validation."""
    x_train, x_val, x_test = _standardise(x_train, x_val, x_test)
    best: HeadResult | None = None
    for l2 in l2_values:
        head = fit_logistic(x_train, y_train, l2)
        with torch.no_grad():
            result = HeadResult(q3(head(x_val).argmax(-1), y_val), q3(head(x_test).argmax(-1), y_test), f"l2={l2:g}")
        if best is None or result.q3_val > best.q3_val:
            best = result
    assert best is not None
    return best


def train_mlp(x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, x_test: Tensor, y_test: Tensor,
              hidden: int = 128, epochs: int = 15, seed: int = 0) -> HeadResult:
    """One hidden layer (ReLU, dropout 0.1), Adam; the epoch with the best validation Q3."""
    x_train, x_val, x_test = _standardise(x_train, x_val, x_test)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Sequential(nn.Linear(x_train.shape[1], hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 3))
    opt = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-4)
    best: HeadResult | None = None
    for epoch in range(1, epochs + 1):
        head.train()
        for idx in torch.randperm(len(x_train), generator=g).split(512):
            opt.zero_grad()
            nn.functional.cross_entropy(head(x_train[idx]), y_train[idx]).backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            result = HeadResult(q3(head(x_val).argmax(-1), y_val), q3(head(x_test).argmax(-1), y_test),
                                f"epoch={epoch}")
        if best is None or result.q3_val > best.q3_val:
            best = result
    assert best is not None
    return best


HEADS: dict[str, Callable[..., HeadResult]] = {"linear": train_linear, "mlp": train_mlp}


def probe_features(splits: dict[str, Sequence[Chain]], features: dict[str, Sequence[Tensor]],
                   heads: Sequence[str]) -> dict[str, dict[str, float | str]]:
    """Train each head on ``features`` of the train chains; Q3 on val and test."""
    data = [stack(splits[s], features[s]) for s in ("train", "val", "test")]
    args = [t for pair in data for t in pair]
    out = {}
    for name in heads:
        r = HEADS[name](*args)
        out[name] = {"q3_test": round(r.q3_test, 4), "q3_val": round(r.q3_val, 4), "chosen": r.choice}
    return out
