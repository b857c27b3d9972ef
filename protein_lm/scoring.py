"""Likelihood scores of whole proteins and of their variants under a trained model.

Sequences (natural log, residues only, ``<cls>``/``<eos>`` never scored):

* masked LM: the pseudo-log-likelihood ``PLL = sum_i log p(x_i | x with position i masked)``
  (Salazar et al. 2020), one masked copy per residue, batched;
* causal LM: the log-likelihood ``sum_i log p(x_i | <cls> x_<i)``.

Variants (Meier et al. 2021, "Language models enable zero-shot prediction of the effects of
mutations on protein function"), for a set ``M`` of substitutions ``wt_i -> mt_i``:

* masked marginal: ``sum_{i in M} log p(x_i = mt_i | x_{-M}) - log p(x_i = wt_i | x_{-M})`` with every
  position of ``M`` masked at once (the paper's best-performing scoring for ESM-1v);
* wild-type marginal: the same differences read from one unmasked pass over the wild type;
* causal models: ``log p(mutant) - log p(wild type)``.

Positive scores mean the model prefers the variant. Long proteins are scored through windows
(:mod:`protein_lm.inference`): each residue is scored in the window where it has the most context
(masked LM: farthest from either edge; causal: most residues to its left); a variant in the window
that holds all its positions farthest from the edges.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from protein_lm.data.readers import Protein
from protein_lm.data.tokenizer import MASK_ID, RESIDUES, TOKEN_TO_ID, TOKENS
from protein_lm.errors import UserError
from protein_lm.inference import autocast, frame, length_sorted_batches, padded_batch, window_starts
from protein_lm.model import ProteinLM

#: Queries gathered before sorting them by length and batching (bounds memory, keeps padding low).
POOL = 512


@dataclass
class Query:
    """One model input and the positions whose next-token / masked-token log-probs are wanted."""

    key: object  # the caller's label for the result
    tokens: np.ndarray  # (L,) int64 framed ids, masked where needed
    read: np.ndarray  # positions in ``tokens`` whose log-probabilities to return


@torch.no_grad()
def run_queries(
    model: ProteinLM,
    queries: Iterable[Query],
    batch_size: int,
    bf16: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[tuple[object, Tensor]]:
    """``(key, log-probs (len(read), V))`` for every query, computed in length-sorted batches.

    Log-probabilities are taken in at least float32 (float64 for a float64 model).
    """
    device = next(model.parameters()).device
    pool: list[Query] = []

    def flush() -> Iterator[tuple[object, Tensor]]:
        for batch in length_sorted_batches([len(q.tokens) for q in pool], batch_size):
            ids, pad = padded_batch([pool[i].tokens for i in batch], device)
            with autocast(device, bf16):
                logits = model(ids, pad).logits
            logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1).cpu()
            for b, i in enumerate(batch):
                yield pool[i].key, logp[b, torch.from_numpy(pool[i].read)]
            if on_batch is not None:
                on_batch(len(batch))
        pool.clear()

    for query in queries:
        pool.append(query)
        if len(pool) >= POOL:
            yield from flush()
    yield from flush()


def best_window(positions: Sequence[int], length: int, window: int, overlap: int, causal: bool) -> int | None:
    """Start of the window that gives ``positions`` the most context, or None if none holds them all."""
    best, best_margin = None, -1
    for s in window_starts(length, window, overlap):
        end = s + min(window, length)
        if not all(s <= p < end for p in positions):
            continue
        margin = min(p - s for p in positions) if causal else min(min(p - s, end - 1 - p) for p in positions)
        if margin > best_margin:
            best, best_margin = s, margin
    return best


def _sequence_queries(index: int, tokens: np.ndarray, window: int, overlap: int, causal: bool) -> Iterator[Query]:
    """The queries that score every residue of one protein (key ``(index, residue positions)``)."""
    n = len(tokens)
    by_window: dict[int, list[int]] = {}
    for p in range(n):
        by_window.setdefault(best_window([p], n, window, overlap, causal), []).append(p)
    for s, positions in by_window.items():
        row = frame(tokens[s : s + window])
        if causal:  # the logits at row position j predict the token at j + 1, i.e. residue s + j
            yield Query((index, np.array(positions)), row, np.array(positions) - s)
            continue
        for p in positions:
            masked = row.copy()
            masked[1 + p - s] = MASK_ID
            yield Query((index, np.array([p])), masked, np.array([1 + p - s]))


def score_sequences(
    model: ProteinLM,
    proteins: Sequence[Protein],
    window: int,
    overlap: int,
    batch_size: int = 8,
    bf16: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> list[float]:
    """Sum of per-residue log-likelihoods (PLL for a masked LM) of each protein, in nats."""
    causal = model.config.causal
    totals = np.zeros(len(proteins), dtype=np.float64)
    queries = (q for i, prot in enumerate(proteins) for q in _sequence_queries(i, prot.tokens, window, overlap, causal))
    for (i, positions), logp in run_queries(model, queries, batch_size, bf16, on_batch):
        targets = torch.from_numpy(proteins[i].tokens[positions].astype(np.int64))
        totals[i] += float(logp.double().gather(1, targets[:, None]).sum())
    return totals.tolist()


def count_sequence_queries(proteins: Sequence[Protein], window: int, overlap: int, causal: bool) -> int:
    """How many model inputs :func:`score_sequences` will run (for a progress bar)."""
    if causal:
        return sum(len({best_window([p], len(x.tokens), window, overlap, True) for p in range(len(x.tokens))})
                   for x in proteins)
    return sum(len(x.tokens) for x in proteins)


# --------------------------------------------------------------------------- variants

_SUBSTITUTION = re.compile(r"([A-Z])(\d+)([A-Z])")
_LETTERS = {c for c in RESIDUES if c.isalpha()}


@dataclass(frozen=True)
class Mutation:
    """One row of a mutations CSV: ``substitutions`` are ``(0-based position, wt id, mutant id)``."""

    line: int
    id: str
    text: str
    substitutions: tuple[tuple[int, int, int], ...]


def parse_mutation(text: str, protein: Protein, where: str) -> tuple[tuple[int, int, int], ...]:
    """``A23P`` or ``A23P:K40E`` (1-based positions) -> substitutions, checked against ``protein``.

    Raises:
        UserError: naming ``where`` (the file and line) and what is wrong.
    """
    subs = []
    for part in text.strip().split(":"):
        m = _SUBSTITUTION.fullmatch(part.strip().upper())
        if m is None:
            raise UserError(f"{where}: {text!r}: expected substitutions like A23P or A23P:K40E (1-based)")
        wt, pos, mt = m.group(1), int(m.group(2)), m.group(3)
        n = len(protein.tokens)
        if not 1 <= pos <= n:
            raise UserError(f"{where}: {part}: position {pos} is outside {protein.id} (1..{n})")
        have = TOKENS[int(protein.tokens[pos - 1])]
        if have != wt:
            raise UserError(f"{where}: {part}: {protein.id} has {have} at position {pos}, not {wt}")
        if mt not in _LETTERS:
            raise UserError(f"{where}: {part}: {mt} is not an amino-acid letter of the alphabet")
        subs.append((pos - 1, TOKEN_TO_ID[wt], TOKEN_TO_ID[mt]))
    positions = [s[0] for s in subs]
    if len(set(positions)) != len(positions):
        raise UserError(f"{where}: {text!r}: a position is mutated twice")
    return tuple(subs)


def read_mutations(path: str | os.PathLike, proteins: dict[str, Protein]) -> list[Mutation]:
    """Rows of a CSV with columns ``id,mutation``, each checked against its protein.

    Raises:
        UserError: a missing file or column, an unknown id, or a bad mutation, naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--mutations {path}: no such file")
    out = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not {"id", "mutation"} <= set(reader.fieldnames or []):
            raise UserError(f"{path}: needs columns id,mutation (has {','.join(reader.fieldnames or [])})")
        for row in reader:
            where = f"{path} line {reader.line_num}"
            pid = (row["id"] or "").strip()
            if pid not in proteins:
                raise UserError(f"{where}: id {pid!r} is not in the FASTA file")
            text = (row["mutation"] or "").strip()
            out.append(Mutation(reader.line_num, pid, text, parse_mutation(text, proteins[pid], where)))
    if not out:
        raise UserError(f"{path}: no mutations")
    return out


def _mutant(protein: Protein, mutation: Mutation) -> Protein:
    tokens = protein.tokens.copy()
    for pos, _, mt in mutation.substitutions:
        tokens[pos] = mt
    return Protein(f"{protein.id}:{mutation.text}", tokens)


def score_mutations(
    model: ProteinLM,
    proteins: dict[str, Protein],
    mutations: Sequence[Mutation],
    window: int,
    overlap: int,
    batch_size: int = 8,
    bf16: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """Per mutation: ``masked_marginal`` and ``wildtype_marginal`` (masked LM) or
    ``delta_log_likelihood`` (causal LM), in nats."""
    if model.config.causal:
        wild = sorted({m.id for m in mutations})
        wt_ll = dict(zip(wild, score_sequences(model, [proteins[i] for i in wild], window, overlap,
                                               batch_size, bf16, on_batch), strict=True))
        mutants = [_mutant(proteins[m.id], m) for m in mutations]
        mt_ll = score_sequences(model, mutants, window, overlap, batch_size, bf16, on_batch)
        return [{"delta_log_likelihood": ll - wt_ll[m.id]} for m, ll in zip(mutations, mt_ll, strict=True)]
    starts = []
    for m in mutations:
        positions = [s[0] for s in m.substitutions]
        start = best_window(positions, len(proteins[m.id].tokens), window, overlap, causal=False)
        if start is None:
            raise UserError(f"mutations line {m.line}: {m.id} {m.text}: the positions span more than the "
                            f"model's window of {window} residues")
        starts.append(start)

    def queries() -> Iterator[Query]:
        seen: set[tuple[str, int]] = set()
        for k, (m, s) in enumerate(zip(mutations, starts, strict=True)):
            row = frame(proteins[m.id].tokens[s : s + window])
            read = np.array([1 + pos - s for pos, _, _ in m.substitutions])
            masked = row.copy()
            masked[read] = MASK_ID
            yield Query(("masked", k), masked, read)
            if (m.id, s) not in seen:  # one unmasked pass per wild-type window serves all its variants
                seen.add((m.id, s))
                yield Query(("wild", m.id, s), row, np.arange(len(row)))

    masked: dict[int, Tensor] = {}
    wild: dict[tuple[str, int], Tensor] = {}
    for key, logp in run_queries(model, queries(), batch_size, bf16, on_batch):
        if key[0] == "masked":
            masked[key[1]] = logp.double()
        else:
            wild[key[1:]] = logp.double()
    out = []
    for k, (m, s) in enumerate(zip(mutations, starts, strict=True)):
        mm = sum(float(masked[k][j, mt] - masked[k][j, wt]) for j, (_, wt, mt) in enumerate(m.substitutions))
        w = wild[(m.id, s)]
        wm = sum(float(w[1 + pos - s, mt] - w[1 + pos - s, wt]) for pos, wt, mt in m.substitutions)
        out.append({"masked_marginal": mm, "wildtype_marginal": wm})
    return out


def count_mutation_queries(mutations: Sequence[Mutation], causal: bool, proteins: dict[str, Protein],
                           window: int, overlap: int) -> int:
    """How many model inputs :func:`score_mutations` will run (for a progress bar)."""
    if causal:
        ids = {m.id for m in mutations}
        mutants = [_mutant(proteins[m.id], m) for m in mutations]
        return count_sequence_queries([proteins[i] for i in ids] + mutants, window, overlap, True)
    wild = {(m.id, best_window([s[0] for s in m.substitutions], len(proteins[m.id].tokens), window, overlap, False))
            for m in mutations}
    return len(mutations) + len(wild)
