"""Adaptive attention span modules: the learned spans (static per head, or dynamic per token), the
kernel that applies them around exact or FAVOR+ attention (with optional persistent memory), and
their logging statistics. The math is in :mod:`protein_lm.attention.ops.span`.

Spans are stored as a fraction of ``S`` (``z = S * span_fraction``) so that an optimiser step of a
given size moves the span by a number of tokens proportional to ``S``; the fraction is clamped to
``[0, 1]`` in place at every forward. The span parameters carry ``optim_overrides =
{"weight_decay": 0.0}`` (read by ``lit_module.param_groups``): decay would pull every span to 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protein_lm.attention.ops.masks import allowed_keys, zero_padded
from protein_lm.attention.ops.span import (
    DEFAULT_RAMP,
    adaptive_span_exact_attention,
    adaptive_span_linear_attention,
    span_mask,
)

__all__ = ["AdaptiveSpan", "SpanPredictor", "AdaptiveSpanKernel", "adaptive_span_modules"]

class SpanPredictor(nn.Module):
    """``x (B, L, dim) -> v^T x + b (B, L, H)``: the logits of dynamic spans.

    Deliberately not an ``nn.Linear``: the model's weight initialisation re-draws every
    ``nn.Linear`` (normal weights, zero bias), which would erase the bias that sets the initial span.
    """

    def __init__(self, dim: int, num_heads: int, init_logit: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_heads, dim))  # (H, dim): starts input-independent
        self.bias = nn.Parameter(torch.full((num_heads,), float(init_logit)))  # (H,)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class AdaptiveSpan(nn.Module):
    """Per-head learnable span (static) or per-token span ``z_t = S * sigmoid(v^T x_t + b)`` (dynamic).

    Args:
        num_heads: ``H``.
        max_span: ``S``, the largest span in tokens.
        ramp: ``R``, width of the linear ramp of the soft mask.
        init_span: initial span in tokens (static: every head; dynamic: via the bias, with ``v = 0``).
        loss_coef: ``lambda`` of the L1 penalty ``lambda * sum_h z_h`` (tokens).
        dynamic: per-token spans predicted from the layer input (both backends).
        dim: model width, required when ``dynamic``.
    """

    def __init__(
        self,
        num_heads: int,
        max_span: int,
        ramp: float = DEFAULT_RAMP,
        init_span: float = 0.0,
        loss_coef: float = 2e-6,
        dynamic: bool = False,
        dim: int | None = None,
    ) -> None:
        super().__init__()
        if max_span <= 0 or ramp <= 0:
            raise ValueError(f"max_span ({max_span}) and ramp ({ramp}) must be positive")
        self.num_heads, self.max_span, self.ramp = num_heads, int(max_span), float(ramp)
        self.loss_coef, self.dynamic = float(loss_coef), dynamic
        frac = min(max(init_span / max_span, 0.0), 1.0)
        if dynamic:
            if dim is None:
                raise ValueError("dynamic spans need `dim`")
            f = min(max(frac, 1e-4), 1 - 1e-4)
            self.span_predictor = SpanPredictor(dim, num_heads, math.log(f / (1 - f)))
            self.register_parameter("span_fraction", None)
        else:
            self.span_predictor = None
            self.span_fraction = nn.Parameter(torch.full((num_heads,), frac))
        for p in self.parameters():  # read by lit_module.param_groups: spans get no weight decay
            p.optim_overrides = {"weight_decay": 0.0}
        # Dynamic: per-head mean span over the real tokens of the last recorded forward, (H,), with
        # its graph (the aux loss of that forward), and the number of tokens it averages.
        self._last_mean: Tensor | None = None
        self._last_count: Tensor | None = None

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project the static span fractions back onto ``[0, 1]`` (also done at every forward)."""
        if self.span_fraction is not None:
            self.span_fraction.clamp_(0.0, 1.0)

    def spans(
        self, x: Tensor | None = None, key_padding_mask: Tensor | None = None, record: bool = True
    ) -> Tensor:
        """Spans in tokens: static ``(H,)``; dynamic ``(B, H, L)`` from the layer input ``x (B, L, dim)``.

        Dynamic spans are recorded (``record=True``) for the aux loss and logging as their per-head
        mean over the real (``key_padding_mask`` False) tokens of ``x``; padded tokens neither pay
        the penalty nor enter the statistics.
        """
        if not self.dynamic:
            self.clamp_()
            return self.max_span * self.span_fraction
        if x is None:
            raise ValueError("dynamic spans need the layer input x")
        logits = self.span_predictor(x)  # (B,L,H); >= float32 (bf16 under autocast), float64 stays
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        z = self.max_span * torch.sigmoid(logits).transpose(1, 2)  # (B,H,L)
        if record:
            if key_padding_mask is None:
                self._last_mean = z.mean(dim=(0, 2))
                self._last_count = torch.tensor(float(z.shape[0] * z.shape[2]))
            else:
                real = (~key_padding_mask.to(torch.bool))[:, None, :].to(z.dtype)  # (B,1,L)
                count = real.sum()  # stays on the device: no host sync per forward
                self._last_mean = (z * real).sum(dim=(0, 2)) / count.clamp_min(1.0)
                self._last_count = count.detach()
        return z

    @property
    def last_num_tokens(self) -> int:
        """Dynamic: how many real tokens the last recorded per-head mean averages (0 before any)."""
        return 0 if self._last_count is None else int(self._last_count)

    def current_spans(self) -> Tensor:
        """Detached spans for logging: static ``(H,)``; dynamic: mean over the last batch's real tokens."""
        with torch.no_grad():
            if self.dynamic:
                if self._last_mean is None:
                    return torch.full((self.num_heads,), float("nan"))
                return self._last_mean.detach().float().cpu()
            return (self.max_span * self.span_fraction.clamp(0, 1)).detach().float().cpu()

    def aux_loss(self) -> Tensor:
        """``lambda * sum_h z_h`` (dynamic: ``z_h`` averaged over the last batch's real tokens)."""
        if self.dynamic:
            if self._last_mean is None:
                return self.span_predictor.bias.new_zeros(())
            return self.loss_coef * self._last_mean.sum()
        return self.loss_coef * (self.max_span * self.span_fraction.clamp(0, 1)).sum()

    def attend_exact(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor | None = None, **kwargs) -> Tensor:
        """:func:`adaptive_span_exact_attention` with this module's spans (``x`` for dynamic spans)."""
        z = self.spans(x, kwargs.get("key_padding_mask"))
        return adaptive_span_exact_attention(q, k, v, z, self.ramp, **kwargs)

    def attend_linear(
        self, phi_q: Tensor, phi_k: Tensor, v: Tensor, x: Tensor | None = None, **kwargs
    ) -> Tensor:
        """:func:`adaptive_span_linear_attention` with this module's spans (``x`` for dynamic spans:
        then the banded per-query path)."""
        z = self.spans(x, kwargs.get("key_padding_mask"))
        return adaptive_span_linear_attention(phi_q, phi_k, v, z, self.ramp, **kwargs)

    statistics_group = "span"  # ProteinLM.statistics logs span/<i>/mean, span/<i>/max, span/mean, span/max

    def statistics(self) -> dict[str, float]:
        """Mean and max span (tokens) over this layer's heads, for logging."""
        z = self.current_spans()
        return {"mean": float(z.mean()), "max": float(z.max())}

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, max_span={self.max_span}, ramp={self.ramp}, dynamic={self.dynamic}"


class AdaptiveSpanKernel(nn.Module):
    """Attention kernel with an adaptive span, optionally with persistent memory slots.

    Same call signature as ``FavorAttention`` / the model's exact kernel:
    ``forward(q, k, v, key_padding_mask=None) -> (B, H, L, D)``; with dynamic spans it also needs
    the layer input, ``forward(q, k, v, key_padding_mask, x=x (B, L, dim))`` -- the attribute
    :attr:`needs_layer_input` tells the caller (``SelfAttention``) to pass it.

    Args:
        span: the layer's :class:`AdaptiveSpan` (static or dynamic spans).
        causal: unidirectional attention.
        favor: a ``FavorAttention`` whose projection / kernel give the features (Performer
            backend); ``None`` selects the exact (trimmed, banded) softmax backend.
        memory: optional :class:`protein_lm.attention.modules.memory.PersistentMemory`; its slots take
            no span mask and share the softmax / normaliser.
    """

    def __init__(
        self,
        span: AdaptiveSpan,
        causal: bool,
        favor: nn.Module | None = None,
        memory: nn.Module | None = None,
    ):
        super().__init__()
        self.span, self.causal, self.favor, self.memory = span, causal, favor, memory

    @property
    def needs_layer_input(self) -> bool:
        """True for dynamic spans: ``forward`` / ``attention_probs`` then need ``x=`` (the layer input)."""
        return self.span.dynamic

    def _spans(self, x: Tensor | None, key_padding_mask: Tensor | None, record: bool = True) -> Tensor:
        if self.span.dynamic and x is None:
            raise ValueError("dynamic spans need the layer input: call the kernel with x=(B, L, dim)")
        return self.span.spans(x, key_padding_mask, record=record)

    def _memory(self) -> tuple[Tensor | None, Tensor | None]:
        if self.memory is None or self.memory.num_slots == 0:
            return None, None
        return self.memory()

    def _features(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None, mem_k: Tensor | None):
        """Features with one key stabiliser over context and memory keys."""
        from protein_lm.attention.ops.favor import favor_features

        assert self.favor is not None
        # Padded queries zeroed before the feature map (favor_features only does this when queries
        # and keys share L, not for the memory-prepended keys below): huge values there would give
        # inf features, and an inf/NaN backward through the map even where the output is masked.
        q = zero_padded(q, key_padding_mask)
        if mem_k is None:
            phi_q, phi_k = favor_features(q, k, self.favor.projection, self.favor.kernel, key_padding_mask)
            return phi_q, phi_k, None
        b, n = q.shape[0], mem_k.shape[1]
        keys = torch.cat([mem_k.to(k.dtype)[None].expand(b, -1, -1, -1), k], dim=2)
        kpm = None
        if key_padding_mask is not None:
            kpm = torch.cat([key_padding_mask.new_zeros(b, n), key_padding_mask.to(torch.bool)], dim=1)
        phi_q, phi_all = favor_features(q, keys, self.favor.projection, self.favor.kernel, kpm)
        return phi_q, phi_all[:, :, n:], phi_all[:, :, :n]

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None, x: Tensor | None = None
    ) -> Tensor:
        spans = self._spans(x, key_padding_mask)  # (H,) or (B,H,L)
        mem_k, mem_v = self._memory()
        if self.favor is None:
            return adaptive_span_exact_attention(
                q, k, v, spans, self.span.ramp, self.causal, key_padding_mask, memory_k=mem_k, memory_v=mem_v
            )
        phi_q, phi_k, phi_m = self._features(q, k, key_padding_mask, mem_k)
        return adaptive_span_linear_attention(
            phi_q,
            phi_k,
            v,
            spans,
            self.span.ramp,
            self.causal,
            key_padding_mask,
            memory_phi_k=phi_m,
            memory_v=mem_v,
            eps=getattr(self.favor, "eps", 1e-6),
        )

    @torch.no_grad()
    @torch.no_grad()
    def attention_probs(
        self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None, rows: range | None = None,
        x: Tensor | None = None,
    ) -> Tensor:
        """Attention over the context ``(B, H, R, L)`` with the span mask (O(L^2); for analysis).

        Rows sum to 1 minus the mass on persistent-memory slots (if any). Dynamic spans need ``x``
        (and are not recorded: analysis does not change the logged spans or the aux loss).
        """
        length = q.shape[2]
        i = torch.arange(length, device=q.device)
        dist = (i[:, None] - i[None, :]).abs().float()
        z = self._spans(x, key_padding_mask, record=False).detach().float()
        zq = z[..., None] if z.dim() == 3 else z[None, :, None, None]  # (B|1,H,L|1,1)
        m = span_mask(dist, zq, self.span.ramp)  # (B|1,H,L,L)
        allowed = allowed_keys(length, length, self.causal, key_padding_mask, q.device)
        if allowed is not None:
            m = m * allowed
        mem_k, _ = self._memory()
        if self.favor is None:
            s = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
            s_mem = (
                None
                if mem_k is None
                else torch.einsum("bhld,hnd->bhln", q.float(), mem_k.float()) * q.shape[-1] ** -0.5
            )
            shift = s.masked_fill(m == 0, -math.inf).amax(-1, keepdim=True)
            if s_mem is not None:
                shift = torch.maximum(shift, s_mem.amax(-1, keepdim=True))
            shift = torch.nan_to_num(shift, neginf=0.0)
            a = torch.exp(s - shift) * m
            den = a.sum(-1, keepdim=True) + (
                0 if s_mem is None else torch.exp(s_mem - shift).sum(-1, keepdim=True)
            )
        else:
            phi_q, phi_k, phi_m = self._features(q, k, key_padding_mask, mem_k)
            a = (phi_q @ phi_k.transpose(-1, -2)) * m
            den = a.sum(-1, keepdim=True) + (
                0 if phi_m is None else (phi_q @ phi_m.transpose(-1, -2)).sum(-1, keepdim=True)
            )
        probs = a / den.clamp_min(1e-30)
        return probs if rows is None else probs[:, :, rows.start : rows.stop]


def adaptive_span_modules(model: nn.Module) -> Iterator[tuple[str, AdaptiveSpan]]:
    """``(name, module)`` for every :class:`AdaptiveSpan` in ``model``, in registration order."""
    for name, mod in model.named_modules():
        if isinstance(mod, AdaptiveSpan):
            yield name, mod
