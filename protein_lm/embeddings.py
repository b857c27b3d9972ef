"""Per-protein embeddings from a trained model: per-residue states, their mean, and ``<cls>``.

What is computed, for every requested layer (ESM's ``repr_layers`` numbering, see
:meth:`protein_lm.model.ProteinLM.forward`: 0 = token embedding, ``depth`` = last block after the
final LayerNorm):

* ``per_tok`` (n, dim): the hidden state at each residue (``<cls>``/``<eos>`` excluded). A protein
  longer than one window is run as overlapping windows (:mod:`protein_lm.inference`); a residue
  seen by several windows gets the average of their states;
* ``mean`` (dim,): the average of ``per_tok`` over the residues (ESM's "mean" representation);
* ``cls`` (dim,): the state at ``<cls>`` (averaged over the windows of a long protein).

On disk (:class:`EmbeddingWriter`, ``protein-lm embed``): a directory holding ``shard-00000.safetensors``, ... (``shard_size``
proteins each, tensors named ``{id}/{layer}/{kind}``, float32) and ``index.json`` mapping each id to
its shard and length; :func:`read_embeddings` reads it back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from protein_lm.data.readers import Protein
from protein_lm.errors import UserError
from protein_lm.inference import (
    autocast,
    frame,
    length_sorted_batches,
    padded_batch,
    window_starts,
)
from protein_lm.model import ProteinLM

KINDS = ("mean", "per_tok", "cls")
INDEX_FORMAT = "protein_lm.embeddings"
INDEX_VERSION = 1


@torch.no_grad()
def embed_proteins(
    model: ProteinLM,
    proteins: Sequence[Protein],
    layers: Sequence[int],
    window: int,
    overlap: int,
    batch_size: int = 8,
    include: Sequence[str] = KINDS,
    bf16: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> list[dict[str, dict[int, Tensor]]]:
    """Embeddings of ``proteins`` (in their order): ``[{kind: {layer: tensor (float32, CPU)}}]``.

    Args:
        model: the model in eval mode, on the device to run on.
        proteins: the proteins; all their windows are batched together, longest first.
        layers: layer indices (negative from the end); results are keyed by the layer in
            ``0..depth`` (e.g. -1 -> depth).
        window: residues per model input (``max_length - 2``).
        overlap: residues shared by consecutive windows of a long protein.
        batch_size: model inputs (windows) per forward pass.
        include: any of ``mean``, ``per_tok``, ``cls``.
        bf16: bfloat16 autocast on CUDA.
        on_batch: called with the number of windows after each batch (progress bars).
    """
    unknown = sorted(set(include) - set(KINDS))
    if unknown or not include:
        raise UserError(f"--include takes some of {', '.join(KINDS)}, got {' '.join(include) or 'nothing'}")
    resolved = sorted(set(model.hidden_layers(layers).values()))
    device = next(model.parameters()).device
    dim = model.config.dim
    starts = [window_starts(len(prot.tokens), window, overlap) for prot in proteins]
    rows = [(p, s) for p, ss in enumerate(starts) for s in ss]  # one model input per window
    lengths = [min(window, len(proteins[p].tokens)) for p, _ in rows]
    # How many windows see each residue, known before any runs: a window's share of a residue's
    # average is its state / count, so the mean needs no per-residue storage.
    counts = []
    for prot, ss in zip(proteins, starts, strict=True):
        c = torch.zeros(len(prot.tokens), dtype=torch.float64)
        for s in ss:
            c[s : s + window] += 1
        counts.append(c)
    keep_tokens = "per_tok" in include
    per_tok = [{layer: torch.zeros(len(p.tokens), dim) for layer in resolved} if keep_tokens else {}
               for p in proteins]
    mean = [{layer: torch.zeros(dim, dtype=torch.float64) for layer in resolved} for _ in proteins]
    cls = [{layer: torch.zeros(dim, dtype=torch.float64) for layer in resolved} for _ in proteins]
    for batch in length_sorted_batches(lengths, batch_size):
        inputs = [frame(proteins[rows[r][0]].tokens[rows[r][1] : rows[r][1] + lengths[r]]) for r in batch]
        ids, pad = padded_batch(inputs, device)
        with autocast(device, bf16):
            hidden = model(ids, pad, return_hidden=resolved).hidden
        hidden = {layer: h.double().cpu() for layer, h in hidden.items()}
        for b, r in enumerate(batch):
            p, start = rows[r]
            n = lengths[r]
            for layer in resolved:
                share = hidden[layer][b, 1 : 1 + n] / counts[p][start : start + n, None]  # (n, dim)
                if keep_tokens:
                    per_tok[p][layer][start : start + n] += share.float()
                mean[p][layer] += share.sum(0) / len(proteins[p].tokens)
                cls[p][layer] += hidden[layer][b, 0] / len(starts[p])
        if on_batch is not None:
            on_batch(len(batch))
    out = []
    for p in range(len(proteins)):
        result: dict[str, dict[int, Tensor]] = {}
        if keep_tokens:
            result["per_tok"] = per_tok[p]
        if "mean" in include:
            result["mean"] = {layer: t.float() for layer, t in mean[p].items()}
        if "cls" in include:
            result["cls"] = {layer: t.float() for layer, t in cls[p].items()}
        out.append(result)
    return out


def tensor_name(protein_id: str, layer: int, kind: str) -> str:
    """The safetensors key of one embedding (ids may hold '|', so '/' separates the parts)."""
    return f"{protein_id}/{layer}/{kind}"


class EmbeddingWriter:
    """Adds shards to a directory and finishes it with ``index.json`` (the caller makes it atomic,
    see :func:`protein_lm.outputs.write_dir_atomically`)."""

    def __init__(self, directory: Path, meta: dict[str, Any]):
        self.directory = Path(directory)
        self.meta = meta
        self.records: dict[str, dict[str, Any]] = {}
        self.shards: list[str] = []

    def add_shard(self, proteins: Sequence[Protein], embeddings: Sequence[dict[str, dict[int, Tensor]]]) -> None:
        from safetensors.torch import save_file

        name = f"shard-{len(self.shards):05d}.safetensors"
        tensors = {
            tensor_name(prot.id, layer, kind): t.contiguous()
            for prot, emb in zip(proteins, embeddings, strict=True)
            for kind, by_layer in emb.items()
            for layer, t in by_layer.items()
        }
        save_file(tensors, str(self.directory / name))
        self.shards.append(name)
        for prot in proteins:
            self.records[prot.id] = {"shard": name, "length": int(len(prot.tokens))}

    def write_index(self) -> None:
        index = {"format": INDEX_FORMAT, "version": INDEX_VERSION, **self.meta,
                 "shards": self.shards, "records": self.records}
        (self.directory / "index.json").write_text(json.dumps(index, indent=1) + "\n")


def read_embeddings(directory: str | os.PathLike, ids: Sequence[str] | None = None
                    ) -> dict[str, dict[str, dict[int, Tensor]]]:
    """``{id: {kind: {layer: tensor}}}`` from a directory written by ``protein-lm embed``.

    Args:
        directory: the ``--out`` directory.
        ids: only these records (default all); only their shards are opened.
    """
    from safetensors import safe_open

    directory = Path(directory)
    index = json.loads((directory / "index.json").read_text())
    records = index["records"]
    wanted = list(records) if ids is None else list(ids)
    missing = [i for i in wanted if i not in records]
    if missing:
        raise KeyError(f"not in {directory}: {missing[:5]}")
    by_shard: dict[str, set[str]] = {}
    for i in wanted:
        by_shard.setdefault(records[i]["shard"], set()).add(i)
    out: dict[str, dict[str, dict[int, Tensor]]] = {i: {} for i in wanted}
    for shard, shard_ids in by_shard.items():
        with safe_open(str(directory / shard), framework="pt") as f:
            for key in f.keys():
                pid, layer, kind = key.rsplit("/", 2)
                if pid in shard_ids:
                    out[pid].setdefault(kind, {})[int(layer)] = f.get_tensor(key)
    return out

