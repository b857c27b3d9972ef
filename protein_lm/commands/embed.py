"""``protein-lm embed``: per-protein embeddings of a FASTA file, keyed by record id.

Writes ``--out DIR`` atomically: ``shard-NNNNN.safetensors`` (``--shard-size`` proteins each; tensors
``{id}/{layer}/{kind}``) plus ``index.json`` (id -> shard, length; the checkpoint, layers and kinds).
Read it with :func:`protein_lm.embeddings.read_embeddings` or any safetensors reader. What the
kinds and layer numbers mean: :mod:`protein_lm.embeddings`.
"""

from __future__ import annotations

import argparse

from protein_lm.embeddings import KINDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="Lightning .ckpt, exported weights file or directory")
    parser.add_argument("--fasta", required=True, help="FASTA(.gz) file; record ids must be unique")
    parser.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    parser.add_argument("--layers", type=int, nargs="+", default=[-1],
                        help="layers: 0 = token embedding, i = block i, -1 = last (after the final "
                             "LayerNorm; default)")
    parser.add_argument("--include", nargs="+", default=["mean"], choices=KINDS,
                        help="mean (dim,), per_tok (length, dim), cls (dim,) (default: mean)")
    parser.add_argument("--batch-size", type=int, default=8, help="model inputs (windows) per batch (default 8)")
    parser.add_argument("--shard-size", type=int, default=1000, help="proteins per output shard (default 1000)")
    parser.add_argument("--overlap", type=int, default=None,
                        help="residues shared by the windows of a protein longer than the model's window "
                             "(default: a quarter of the window)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from protein_lm.checkpoint import load_model
    from protein_lm.data.readers import read_proteins
    from protein_lm.devices import resolve_device
    from protein_lm.embeddings import EmbeddingWriter, embed_proteins
    from protein_lm.errors import UserError
    from protein_lm.inference import progress, residues_per_window, window_starts
    from protein_lm.outputs import check_output_dir, write_dir_atomically

    if args.shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {args.shard_size}")
    check_output_dir(args.out, "--out")
    device = resolve_device(args.device)
    model, info = load_model(args.checkpoint)
    model.to(device).eval()
    try:
        layers = sorted(set(model.hidden_layers(args.layers).values()))
    except IndexError as err:
        raise UserError(f"--layers: {err}") from None
    window = residues_per_window(model.config.max_length)
    overlap = window // 4 if args.overlap is None else args.overlap
    window_starts(window + 1, window, overlap)  # checks the overlap before any work
    proteins = read_proteins(args.fasta)
    meta = {"checkpoint": str(args.checkpoint), "fasta": str(args.fasta), "layers": layers,
            "include": list(dict.fromkeys(args.include)), "dim": model.config.dim,
            "window": window, "overlap": overlap, "objective": info["objective"]}
    total = sum(len(window_starts(len(p.tokens), window, overlap)) for p in proteins)
    shards: list[str] = []

    def write(tmp) -> None:
        writer = EmbeddingWriter(tmp, meta)
        with progress(total, "window", not args.quiet) as bar:
            for i in range(0, len(proteins), args.shard_size):
                shard = proteins[i : i + args.shard_size]
                emb = embed_proteins(model, shard, layers, window, overlap, args.batch_size,
                                     meta["include"], args.bf16, on_batch=bar.update)
                writer.add_shard(shard, emb)
        writer.write_index()
        shards.extend(writer.shards)

    out = write_dir_atomically(args.out, write, "--out")
    print(f"wrote {out}: {len(proteins):,} proteins, layers {layers}, {' '.join(meta['include'])}, "
          f"{len(shards)} shard(s), index {out / 'index.json'}")
    return 0
