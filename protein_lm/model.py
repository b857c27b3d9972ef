"""The protein language model: a plain ``nn.Module`` configured by a dataclass.

``ProteinLM`` is a pre-LayerNorm Transformer encoder (bidirectional, masked-LM) or
decoder (unidirectional, causal-LM) over the 33-token ESM-2 alphabet, with a tied
input/output embedding. Its attention is chosen per config:

* ``performer-softmax`` — FAVOR+ with positive random features (the Performer
  paper's default, an unbiased estimate of softmax attention);
* ``performer-relu`` — FAVOR with the ReLU kernel (the paper's best protein model);
* ``exact`` — ordinary softmax attention through ``scaled_dot_product_attention``,
  the baseline every result is compared with.

It needs no Trainer: notebooks and ``protein_lm.analysis`` build it from a
:class:`ModelConfig` (or :func:`protein_lm.checkpoint.load_model`) and call it
directly.

Positions: rotary embeddings (RoPE, Su et al. 2021) rotate each query and key by
an angle proportional to its position *before* the feature map. Why rotary:

* nothing is learned per position, so there is no length limit — a model trained
  on 1,024-token crops runs on 8,192-token concatenations (or longer) unchanged,
  which learned absolute embeddings cannot do;
* it needs only q and k, never the (L, L) matrix, so it composes with linear
  attention: FAVOR+ estimates ``exp(q_i'·k_j')`` of the *rotated* vectors, and
  ``q_i'·k_j' = q_i·R(j−i)k_j`` depends on the offset only, so the estimated
  kernel carries relative-position information (exactly so for ``exact`` and in
  expectation for ``performer-softmax``; the ReLU kernel also sees rotated
  vectors, which makes it position-aware though not strictly relative);
* it costs O(L·D) per layer, like the rest of the linear-attention path.
``position="learned"`` (absolute, limited to ``max_length``) and ``"none"`` are
kept for ablations.

Extending a block (adaptive span, persistent memory, product-key memory): a
:class:`Block` builds its sublayers through :meth:`Block.build_attention` and
:meth:`Block.build_ffn`, and :class:`SelfAttention` builds its kernel through
:meth:`SelfAttention.build_kernel` — override or extend those factories. Any
submodule that defines a method ``aux_loss() -> Tensor`` (e.g. an L1 penalty on
learned spans) contributes to :attr:`ModelOutput.aux_loss`, which the
LightningModule adds to the training loss. Parameters that need their own
optimiser settings carry a dict attribute ``optim_overrides`` (e.g.
``{"weight_decay": 0.0}`` or ``{"lr": 1e-3, "weight_decay": 0.0}``); see
:func:`protein_lm.lit_module.param_groups`.

Shapes: B batch, L length, H heads, D head dim (dim // heads), M random features,
V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protein_lm.attention import registry
from protein_lm.attention.ops.exact_segments import SegmentMask, positions_from_segments, segment_mask
from protein_lm.attention.ops.segments import segment_labels
from protein_lm.model_config import (  # noqa: F401 - the config is part of this module's interface
    ATTENTION_KINDS,
    POSITION_KINDS,
    AttentionKind,
    MemoryConfig,
    ModelConfig,
    PKMConfig,
    SpanConfig,
)


def collect_statistics(root: nn.Module) -> dict[str, float]:
    """``{group}/{i}/{key}`` for every submodule with ``statistics() -> dict`` and a
    ``statistics_group`` (``i``: its index within the group, in module order), plus ``{group}/mean``
    and ``{group}/max`` over the group's modules for the keys ``mean`` and ``max`` (e.g. adaptive
    spans: ``span/0/mean`` ... ``span/max``; product-key memory: ``pkm/0/used`` ...).

    The training loop logs these without knowing which layers keep statistics.
    """
    out: dict[str, float] = {}
    index: dict[str, int] = {}
    summary: dict[str, dict[str, list[float]]] = {}
    for module in root.modules():
        group = getattr(module, "statistics_group", None)
        if group is None or not callable(getattr(module, "statistics", None)):
            continue
        i = index[group] = index.get(group, -1) + 1
        for key, value in module.statistics().items():
            out[f"{group}/{i}/{key}"] = float(value)
            if key in ("mean", "max"):
                summary.setdefault(group, {}).setdefault(key, []).append(float(value))
    for group, keys in summary.items():
        if "mean" in keys:
            out[f"{group}/mean"] = sum(keys["mean"]) / len(keys["mean"])
        if "max" in keys:
            out[f"{group}/max"] = max(keys["max"])
    return out


class ModelOutput(NamedTuple):
    """What :meth:`ProteinLM.forward` returns."""

    logits: Tensor  # (B, L, V)
    aux_loss: Tensor  # scalar; sum of the submodules' auxiliary losses (0 when none)
    # {layer: (B, L, dim)} for the layers asked for with ``return_hidden``; None otherwise
    hidden: dict[int, Tensor] | None = None


class Segments(NamedTuple):
    """Packed rows, as every layer of one forward pass sees them (built once by :meth:`ProteinLM.forward`)."""

    segment_ids: Tensor  # (B, L) int, the protein of each token (padding: its own segment or masked)
    positions: Tensor  # (B, L) int, position inside the protein (0 at its <cls>)
    mask: SegmentMask | None  # exact attention's shared mask (flex BlockMask or dense); None for FAVOR


def segments_unsupported(config: ModelConfig) -> str | None:
    """The ``ModelConfig`` option that cannot keep packed proteins apart, or None when all can.

    Exact and FAVOR attention take the segments (``FavorAttention.forward(..., segment_ids=)``).
    Adaptive spans (static or dynamic) mask by distance and persistent memory adds shared key/value
    slots through kernels that know no segments, so in a packed row they would attend across
    proteins. Product-key memory reads each token's own query (LayerNorm: per token; padding-aware
    BatchNorm: statistics over the batch's real tokens, as in a padded batch), so it needs nothing.
    """
    if config.span.enabled:
        return "span.enabled"
    if config.memory.slots:
        return "memory.slots"
    return None


# --------------------------------------------------------------------------- positions


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE), computed on the fly for any length.

    Rotates consecutive halves ``(x[..., :D/2], x[..., D/2:])`` by angles
    ``pos * base**(-2i/D)``. Angles are computed in float32.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def tables(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``cos``, ``sin`` of the angles, ``(L, D/2)`` float32 each."""
        pos = torch.arange(length, device=device, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq.to(device))  # (L, D/2)
        return angles.cos(), angles.sin()

    def tables_at(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``cos``, ``sin`` at given positions ``(B, L)``: ``(B, 1, L, D/2)`` float32 each (the same
        float32 products as :meth:`tables`, so position ``p`` gets bitwise the same angle)."""
        angles = positions.float()[..., None] * self.inv_freq.to(positions.device)  # (B, L, D/2)
        return angles.cos()[:, None], angles.sin()[:, None]

    def forward(self, q: Tensor, k: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # q, k: (B, H, L, D) -> same; positions: (B, L) or None (0 .. L-1 in every row)
        if positions is None:
            cos, sin = self.tables(q.shape[-2], q.device)
        else:
            cos, sin = self.tables_at(positions)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _fused_rotary_split(qkv: Tensor, head_dim: int):
    """The fused Triton qkv split + rotary, or None where it does not apply (CPU, torch.compile,
    odd head sizes, no Triton): the PyTorch code below is then used (and is the reference)."""
    if not qkv.is_cuda:
        return None
    try:
        from protein_lm.attention.ops.rotary_triton import rotary_split, rotary_split_supported
    except Exception:  # no (working) Triton
        return None
    return rotary_split if rotary_split_supported(qkv, head_dim) else None


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, H, L, D/2) each
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


# --------------------------------------------------------------------------- attention


class SelfAttention(nn.Module):
    """Multi-head self-attention: projections, rotary positions and a pluggable kernel."""

    def __init__(self, config: ModelConfig, layer_index: int = 0):
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        self.heads = config.heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.out = nn.Linear(config.dim, config.dim)
        self.out.residual_projection = True  # scaled init, see ProteinLM._init_weights
        self.rotary = (
            RotaryEmbedding(self.head_dim, config.rotary_base) if config.position == "rotary" else None
        )
        self.kernel = self.build_kernel(config)
        self.dropout = nn.Dropout(config.dropout)

    def build_kernel(self, config: ModelConfig) -> nn.Module:
        """The attention kernel ``forward(q, k, v, key_padding_mask) -> (B, H, L, D)``, from the
        registry (:func:`protein_lm.attention.registry.build_attention`)."""
        return registry.build_attention(config, self.layer_index)

    def project(self, x: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, dim) -> q, k, v each (B, H, L, D), rotary applied to q and k (at ``positions``
        ``(B, L)`` when given, else at 0 .. L-1)."""
        b, length, _ = x.shape
        qkv = self.qkv(x)
        # The fused kernel reads one (L, D/2) table for all rows; per-token positions take the torch path.
        fused = self.rotary is not None and positions is None
        split = _fused_rotary_split(qkv, self.head_dim) if fused else None
        if split is not None:  # CUDA, eager: one Triton pass (attention/ops/rotary_triton.py), same numbers
            return split(qkv, *self.rotary.tables(length, x.device), self.heads)
        qkv = qkv.view(b, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, L, D) each
        if self.rotary is not None:
            q, k = self.rotary(q, k, positions)
        return q, k, v

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, segments: Segments | None = None) -> Tensor:
        # x: (B, L, dim); padding_mask: (B, L) True at padding; segments: packed rows (or None)
        b, length, _ = x.shape
        q, k, v = self.project(x, None if segments is None else segments.positions)
        extra = self.kernel_inputs(x)
        if segments is not None:
            if getattr(self.kernel, "takes_segment_mask", False):  # exact: one mask for all layers
                extra["segment_mask"] = segments.mask
            else:  # FAVOR: prefix / key sums per segment
                extra["segment_ids"] = segments.segment_ids
        y = self.kernel(q, k, v, key_padding_mask=padding_mask, **extra)  # (B, H, L, D)
        y = y.transpose(1, 2).reshape(b, length, self.heads * self.head_dim)
        return self.dropout(self.out(y))

    def kernel_inputs(self, x: Tensor) -> dict[str, Any]:
        """Keyword inputs the kernel takes besides q, k, v: the layer input for dynamic spans."""
        return {"x": x} if getattr(self.kernel, "needs_layer_input", False) else {}

    def attention_probs(self, x: Tensor, padding_mask: Tensor | None = None, rows: range | None = None) -> Tensor:
        """Attention weights ``(B, H, R, L)`` of query rows ``rows`` (default all) for analysis
        (implied attention for Performer; :func:`protein_lm.attention.registry.attention_probs`)."""
        q, k, _ = self.project(x)
        return registry.attention_probs(self.kernel, q, k, padding_mask, rows, **self.kernel_inputs(x))

    def attention_blocks(
        self, x: Tensor, padding_mask: Tensor | None, rows_per_block: int
    ) -> Iterator[tuple[int, Tensor]]:
        """``(row_start, attention (B, H, rows, L))`` over consecutive row blocks covering ``0 .. L-1``,
        with q and k projected once (analysis of long sequences: one block in memory at a time)."""
        q, k, _ = self.project(x)
        extra = self.kernel_inputs(x)
        length = q.shape[-2]
        for start in range(0, length, rows_per_block):
            rows = range(start, min(length, start + rows_per_block))
            yield start, registry.attention_probs(self.kernel, q, k, padding_mask, rows, **extra)


class FeedForward(nn.Module):
    """Position-wise MLP: Linear -> GELU -> Linear."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.dim, config.ff_dim)
        self.fc2 = nn.Linear(config.ff_dim, config.dim)
        self.fc2.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: ``x + attn(LN(x))``, then ``x + ffn(LN(x))``.

    ``ffn`` may be ``None`` (e.g. an all-attention layer that replaces it); extensions
    plug in through :meth:`build_attention` / :meth:`build_ffn`.
    """

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.norm1 = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.attn = self.build_attention(config, layer_index)
        self.ffn = self.build_ffn(config, layer_index)
        self.norm2 = nn.LayerNorm(config.dim, eps=config.layer_norm_eps) if self.ffn is not None else None

    def build_attention(self, config: ModelConfig, layer_index: int) -> nn.Module:
        """Attention sublayer: ``forward(x (B,L,dim), padding_mask) -> (B,L,dim)``."""
        return SelfAttention(config, layer_index)

    def build_ffn(self, config: ModelConfig, layer_index: int) -> nn.Module | None:
        """Feed-forward sublayer: ``forward(x (B,L,dim)) -> (B,L,dim)``, or None for none."""
        ffn = None if config.memory.replace_ffn else FeedForward(config)
        if layer_index in {i % config.depth for i in config.pkm.layers}:
            from protein_lm.layers.pkm import PKMFeedForward, ProductKeyMemory

            pkm = ProductKeyMemory(
                config.dim,
                num_keys=config.pkm.num_keys,
                topk=config.pkm.topk,
                heads=config.pkm.heads,
                key_dim=config.pkm.key_dim,
                query_norm=config.pkm.query_norm,
                value_lr=config.pkm.value_lr,
            )
            return PKMFeedForward(pkm, ffn if config.pkm.mode == "beside" else None)
        return ffn

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, segments: Segments | None = None) -> Tensor:
        # an attention sublayer from build_attention needs to take `segments` only for packed rows
        x = x + (self.attn(self.norm1(x), padding_mask) if segments is None
                 else self.attn(self.norm1(x), padding_mask, segments))
        if self.ffn is not None:
            if getattr(self.ffn, "takes_padding_mask", False):  # e.g. product-key memory
                x = x + self.ffn(self.norm2(x), padding_mask)
            else:
                x = x + self.ffn(self.norm2(x))
        return x


# --------------------------------------------------------------------------- model


class ProteinLM(nn.Module):
    """Protein language model (see the module docstring).

    Example::

        model = ProteinLM(ModelConfig(dim=64, depth=2, heads=4, ff_dim=128))
        out = model(input_ids)            # out.logits: (B, L, 33)
        out = model(input_ids, return_hidden=[0, -1])  # out.hidden[-1]: (B, L, dim), final LayerNorm
        for layer, attn in model.attention_maps(input_ids):
            ...                           # attn: (B, H, L, L), rows sum to 1
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim, padding_idx=config.padding_idx)
        self.pos_embed = nn.Embedding(config.max_length, config.dim) if config.position == "learned" else None
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(self.build_block(config, i) for i in range(config.depth))
        self.norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        # Output head tied to the input embedding; only a per-token bias is separate.
        self.head_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.apply(self._init_weights)

    def build_block(self, config: ModelConfig, layer_index: int) -> nn.Module:
        """One Transformer block (factory so that subclasses / options can swap it)."""
        return Block(config, layer_index)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "residual_projection", False):
                std = std / math.sqrt(2 * self.config.depth)  # GPT-2: keep the residual stream's scale
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # -- forward ---------------------------------------------------------------

    def _padding_mask(self, input_ids: Tensor, padding_mask: Tensor | None) -> Tensor | None:
        """Use the given mask; without one, treat ``<pad>`` tokens as padding."""
        if padding_mask is not None:
            return padding_mask.bool()
        pad = input_ids.eq(self.config.padding_idx)
        if torch.compiler.is_compiling() and self.config.is_performer:
            # no host sync (nor graph break); an all-False mask is exact and costs FAVOR+ little (it
            # would cost exact attention its flash kernel, so that keeps the check)
            return pad
        return pad if bool(pad.any()) else None

    def embed_tokens(self, input_ids: Tensor, positions: Tensor | None = None) -> Tensor:
        """(B, L) token ids -> (B, L, dim) input of the first block (``positions`` (B, L): learned
        positions read there instead of at 0 .. L-1)."""
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            length = input_ids.shape[1]
            if length > self.config.max_length:  # positions inside a row are < L as well
                raise ValueError(
                    f"sequence length {length} exceeds max_length {self.config.max_length} "
                    "of a model with learned positions (rotary positions have no limit)"
                )
            at = torch.arange(length, device=input_ids.device) if positions is None else positions
            x = x + self.pos_embed(at)
        return self.dropout(x)

    def segments(self, segment_ids: Tensor, positions: Tensor | None, padding_mask: Tensor | None,
                 backend: str = "auto") -> Segments:
        """The :class:`Segments` of one pass; exact attention's mask is built here, once for all layers.

        Raises:
            ValueError: the model has an option that cannot keep segments apart.
        """
        unsupported = segments_unsupported(self.config)
        if unsupported is not None:
            raise ValueError(f"segment_ids (packed rows) are not supported with {unsupported}="
                             f"{self.config.option(unsupported)!r}: attention would cross proteins")
        # A segment is a run of equal ids (what FAVOR's sums and the positions use); relabelling
        # once makes exact attention agree on ids that repeat after another protein, e.g. 0 0 1 1 0 0.
        segment_ids = segment_labels(segment_ids)
        if positions is None:
            positions = positions_from_segments(segment_ids)
        mask = None
        kernels = (getattr(getattr(block, "attn", None), "kernel", None) for block in self.blocks)
        if any(getattr(kernel, "takes_segment_mask", False) for kernel in kernels):
            mask = segment_mask(segment_ids, padding_mask, self.config.causal, backend)
        return Segments(segment_ids, positions, mask)

    def forward(
        self,
        input_ids: Tensor,
        padding_mask: Tensor | None = None,
        return_hidden: Iterable[int] | None = None,
        *,
        segment_ids: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> ModelOutput:
        """Logits for every position, and on request the hidden states of chosen layers.

        Args:
            input_ids: (B, L) token ids.
            padding_mask: (B, L) bool, True at padding. ``None``: positions holding the
                ``<pad>`` id are treated as padding.
            segment_ids: (B, L) integer protein of each token of packed rows (``mode: packed``):
                attention stays inside a segment and positions restart in each. ``None``: one
                sequence per row.
            positions: (B, L) integer position of each token inside its protein (rotary and learned
                positions are read there). ``None``: derived from ``segment_ids`` (contiguous runs),
                or 0 .. L-1 without them.
            return_hidden: layers whose output to return, ESM's ``repr_layers`` convention:
                0 is the embedding (the first block's input), ``i`` the output of block ``i``
                (1-based), and ``depth`` the last block's output after the final LayerNorm
                (what the output head reads); negative indices count from the end (-1 = depth).

        Returns:
            ``ModelOutput(logits (B, L, V), aux_loss scalar, hidden {layer: (B, L, dim)} or None)``,
            ``hidden`` keyed by the indices as given. Padding never changes the outputs at real
            positions.
        """
        mask = self._padding_mask(input_ids, padding_mask)
        segments = None
        if positions is not None and segment_ids is None:
            raise ValueError("positions are read only for packed rows: give segment_ids too")
        if segment_ids is not None:
            segments = self.segments(segment_ids, positions, mask)
            positions = segments.positions
        wanted = self.hidden_layers(return_hidden) if return_hidden is not None else None
        keep = set(wanted.values()) if wanted is not None else ()
        hidden: dict[int, Tensor] = {}
        x = self.embed_tokens(input_ids, positions)
        for i, block in enumerate(self.blocks):
            if i in keep:
                hidden[i] = x
            x = block(x, mask) if segments is None else block(x, mask, segments)
        x = self.norm(x)
        logits = F.linear(x, self.embed.weight, self.head_bias)  # (B, L, V)
        if wanted is None:
            return ModelOutput(logits=logits, aux_loss=self.aux_loss(device=logits.device))
        hidden[len(self.blocks)] = x
        chosen = {given: hidden[layer] for given, layer in wanted.items()}
        return ModelOutput(logits=logits, aux_loss=self.aux_loss(device=logits.device), hidden=chosen)

    def hidden_layers(self, layers: Iterable[int]) -> dict[int, int]:
        """``{given index: layer in 0..depth}`` for ``return_hidden`` (negative from the end).

        Raises:
            IndexError: an index outside ``-(depth + 1) .. depth``.
        """
        depth = len(self.blocks)
        out: dict[int, int] = {}
        for given in layers:
            given = int(given)
            if not -(depth + 1) <= given <= depth:
                raise IndexError(f"layer {given} out of range for a {depth}-layer model (0..{depth}, or negative)")
            out[given] = given % (depth + 1)
        return out

    def statistics(self) -> dict[str, float]:
        """Logged statistics of the submodules that keep any (:func:`collect_statistics`)."""
        return collect_statistics(self)

    def reset_statistics(self) -> None:
        """Start the submodules' statistics afresh (``reset_statistics()`` of each that has one)."""
        for module in self.modules():
            if module is not self and callable(getattr(module, "reset_statistics", None)):
                module.reset_statistics()

    def aux_loss(self, device: torch.device | None = None) -> Tensor:
        """Sum of ``aux_loss()`` over submodules that define it (0 when none do)."""
        total = torch.zeros((), device=device if device is not None else self.head_bias.device)
        for module in self.modules():
            if module is not self and callable(getattr(module, "aux_loss", None)):
                total = total + module.aux_loss()
        return total

    # -- analysis --------------------------------------------------------------

    def attention_maps(
        self,
        input_ids: Tensor,
        padding_mask: Tensor | None = None,
        layers: Iterable[int] | None = None,
    ) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(layer_index, attention (B, H, L, L))`` one layer at a time.

        Performer layers give their *implied* attention (row-normalised
        ``phi(Q) phi(K)^T`` with the layer's current projection); ``exact`` layers give
        the softmax probabilities. Rows of real queries sum to 1; padded keys get 0.
        Runs without gradients and stops after the last requested layer, so memory
        holds one layer's (L, L) maps at a time. Uses the module's current mode: call
        ``model.eval()`` first to disable dropout.

        Args:
            input_ids: (B, L) token ids.
            padding_mask: (B, L) bool, True at padding (``None``: ``<pad>`` ids).
            layers: indices to return (negative counts from the end); default all.
        """
        depth = len(self.blocks)
        wanted = set(range(depth)) if layers is None else {i % depth for i in layers}
        for i in wanted:
            if not 0 <= i < depth:
                raise IndexError(f"layer {i} out of range for a {depth}-layer model")
        if not wanted:
            return
        last = max(wanted)
        with torch.no_grad():
            mask = self._padding_mask(input_ids, padding_mask)
            x = self.embed_tokens(input_ids)
        for i, block in enumerate(self.blocks):
            if i in wanted:
                with torch.no_grad():
                    maps = block.attn.attention_probs(block.norm1(x), mask)
                yield i, maps
                del maps
            if i == last:
                return
            with torch.no_grad():
                x = block(x, mask)

    def compiled(self, mode: str | None = None) -> Any:
        """``torch.compile(self, mode=mode)``: one graph per pass, the fused Triton FAVOR+ kernels
        included (``mode`` e.g. ``"reduce-overhead"``: CUDA graphs, for fixed batch shapes).

        The kernels are registered torch ops (``attention/ops/favor_triton.py``), opaque to Inductor, which
        fuses everything around them (projections, norms, MLPs, rotary, loss inputs) without a graph
        break. The compiled callable shares this module's parameters.
        """
        if any(getattr(module, "backend", "torch") != "torch" for module in self.favor_modules()):
            from protein_lm.attention.modules.favor import fused_kernels

            fused_kernels()  # import (and register) the kernels now, outside the traced code
        return torch.compile(self, mode=mode)

    # -- Performer projections -------------------------------------------------

    def favor_modules(self) -> list[nn.Module]:
        """The FAVOR attention kernels of this model (empty for ``exact``)."""
        return [m for m in self.modules() if callable(getattr(m, "redraw_projection", None))]

    @torch.no_grad()
    def redraw_projections(self, generator: torch.Generator | None = None) -> int:
        """Redraw every Performer layer's random projection; returns how many were redrawn.

        Pass a seeded CPU ``torch.Generator`` for reproducible redraws (the
        LightningModule derives one from its seed and the optimiser step).
        """
        kernels = self.favor_modules()
        for kernel in kernels:
            kernel.redraw_projection(generator)
        return len(kernels)

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
