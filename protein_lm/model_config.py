"""``ModelConfig``: the hyper-parameters of :class:`protein_lm.model.ProteinLM`, as a dataclass.

The core fields (width, depth, heads, attention kind, positions, ...) sit at the top level; the
FAIR mechanisms (docs/fair_mechanisms.md) each have their own group, all off by default:

* ``span`` (:class:`SpanConfig`): adaptive attention span (Sukhbaatar et al. 2019);
* ``memory`` (:class:`MemoryConfig`): persistent key/value memory and all-attention layers
  (Sukhbaatar et al. 2019, "Augmenting self-attention with persistent memory");
* ``pkm`` (:class:`PKMConfig`): product-key memory (Lample et al. 2019).

In YAML and on the command line they nest (``model.config.span.max: 512``,
``--model.config.pkm.layers [-1]``); in Python a group may be given as a dict
(``ModelConfig(span={"enabled": True, "max": 512})``).

Configs and checkpoints written before the groups existed name these options flat
(``span_max``, ``persistent_memory``, ``pkm_layers``, ...). :meth:`ModelConfig.from_dict` and the
training commands translate them (:data:`FLAT_KEYS`) with a deprecation message naming the new key.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Literal

from protein_lm.attention import registry
from protein_lm.data.tokenizer import PAD_ID, VOCAB_SIZE
from protein_lm.errors import OldConfigNames

ATTENTION_KINDS: tuple[str, ...] = tuple(registry.KINDS)  # the built-in kinds (attention/registry.py)
# The command-line parser checks the choice (and lists it in --help) from this type: it holds the
# kinds registered when this module is imported; ModelConfig itself accepts any registered kind.
AttentionKind = Literal[ATTENTION_KINDS]  # type: ignore[valid-type]
POSITION_KINDS: tuple[str, ...] = ("rotary", "learned", "none")


@dataclass
class SpanConfig:
    """Adaptive attention span: each head learns how far back (and ahead) it looks.

    Args:
        enabled: learn a span per head; exact attention is then computed over a band (trimmed),
            Performer attention with the exact linear-time mask.
        max: largest span S in tokens.
        ramp: width R of the soft mask's linear ramp.
        init: initial span in tokens.
        loss_coef: lambda of the L1 span penalty (added to the model's ``aux_loss``).
        dynamic: per-token spans ``z_t = S * sigmoid(v^T x_t + b)`` predicted from the layer input
            instead of one learned span per head (both backends; Performer: banded).
    """

    enabled: bool = False
    max: int = 1024
    ramp: float = 32.0
    init: float = 0.0
    loss_coef: float = 2e-6
    dynamic: bool = False


@dataclass
class MemoryConfig:
    """Persistent memory: learned key/value slots every query can attend to.

    Args:
        slots: N persistent key/value slots per head and layer (0 = off).
        replace_ffn: drop the feed-forward sublayer (all-attention layer; needs ``slots`` > 0).
    """

    slots: int = 0
    replace_ffn: bool = False


@dataclass
class PKMConfig:
    """Product-key memory: a large sparse key/value table read by top-k search.

    Args:
        layers: block indices (negative from the end) that get a product-key memory.
        mode: ``replace`` the block's FFN with the memory, or put it ``beside`` (summed).
        num_keys: sub-keys per half n (n^2 memory slots).
        topk: slots read per memory head.
        heads: memory heads.
        key_dim: query / key width.
        query_norm: ``layernorm`` or padding-aware ``batchnorm`` on the queries.
        value_lr: constant learning rate of the memory values (no weight decay).
    """

    layers: list[int] = dataclasses.field(default_factory=list)
    mode: Literal["replace", "beside"] = "replace"
    num_keys: int = 128
    topk: int = 32
    heads: int = 4
    key_dim: int = 128
    query_norm: Literal["layernorm", "batchnorm"] = "layernorm"
    value_lr: float = 1e-3


GROUPS: dict[str, type] = {"span": SpanConfig, "memory": MemoryConfig, "pkm": PKMConfig}


# The flat names of configs and checkpoints written before the groups, and their nested names.
FLAT_KEYS: dict[str, str] = {
    "adaptive_span": "span.enabled",
    "span_max": "span.max",
    "span_ramp": "span.ramp",
    "span_init": "span.init",
    "span_loss_coef": "span.loss_coef",
    "span_dynamic": "span.dynamic",
    "persistent_memory": "memory.slots",
    "replace_ffn": "memory.replace_ffn",
    **{f"pkm_{f.name}": f"pkm.{f.name}" for f in dataclasses.fields(PKMConfig)},
}


@dataclass
class ModelConfig:
    """Hyper-parameters of :class:`ProteinLM`.

    Args:
        vocab_size: number of token ids (33 for the ESM-2 alphabet; linked from the data module).
        dim: model width d.
        depth: number of Transformer blocks.
        heads: attention heads; ``dim`` must be divisible by ``heads``.
        ff_dim: hidden width of the feed-forward sublayer.
        attention: a kind of :mod:`protein_lm.attention.registry`: ``performer-softmax``,
            ``performer-relu`` or ``exact``.
        num_features: random features M per head (Performer only).
        causal: unidirectional (causal LM) when True, bidirectional (masked LM) when False.
            The LightningModule sets it from its ``objective``.
        dropout: dropout on embeddings, attention output and FFN (0 disables).
        max_length: training length; only ``position="learned"`` is limited by it.
        position: ``rotary`` (default; no length limit), ``learned`` (absolute), or ``none``.
        rotary_base: RoPE frequency base.
        orthogonal_features: draw orthogonal random features (FAVOR+) rather than i.i.d. Gaussian.
        favor_backend: ``auto`` (Triton on CUDA when available), ``torch`` or ``triton``.
        feature_seed: seed for the initial random projections (None: drawn from torch's RNG).
        layer_norm_eps: LayerNorm epsilon.
        init_std: standard deviation of the normal initialisation of weights.
        padding_idx: id of the padding token (its embedding row gets no gradient).
        span: adaptive attention span (:class:`SpanConfig`; off by default).
        memory: persistent memory / all-attention layers (:class:`MemoryConfig`; off by default).
        pkm: product-key memory (:class:`PKMConfig`; off by default).
    """

    vocab_size: int = VOCAB_SIZE
    dim: int = 512
    depth: int = 6
    heads: int = 8
    ff_dim: int = 2048
    attention: AttentionKind = "performer-softmax"
    num_features: int = 256
    causal: bool = False
    dropout: float = 0.0
    max_length: int = 1024
    position: Literal["rotary", "learned", "none"] = "rotary"
    rotary_base: float = 10000.0
    orthogonal_features: bool = True
    favor_backend: Literal["auto", "torch", "triton"] = "auto"
    feature_seed: int | None = None
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    padding_idx: int = PAD_ID
    span: SpanConfig = dataclasses.field(default_factory=SpanConfig)
    memory: MemoryConfig = dataclasses.field(default_factory=MemoryConfig)
    pkm: PKMConfig = dataclasses.field(default_factory=PKMConfig)

    def __post_init__(self) -> None:
        for name, group in GROUPS.items():
            value = getattr(self, name)
            if value is None:  # `span: null` in a YAML override: the group's defaults (off)
                setattr(self, name, group())
            elif isinstance(value, dict):
                setattr(self, name, _group_from_dict(name, group, value))
            elif isinstance(value, group):
                # a copy: dataclasses.replace(config) must not share (and later mutate) the groups
                setattr(self, name, dataclasses.replace(value))
            else:
                raise ValueError(f"{name} must be a mapping of its options (e.g. {name}: {{...}}), got {value!r}")
        # Checked here, not where torch would fail later with a message that names no option.
        for name in ("vocab_size", "dim", "depth", "heads", "ff_dim", "num_features", "max_length", "span.max",
                     "pkm.num_keys", "pkm.topk", "pkm.heads", "pkm.key_dim"):
            value = self.option(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, got {value!r}")
        if not 0 <= self.dropout < 1:  # also refuses NaN
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("rotary_base", "layer_norm_eps", "init_std", "span.ramp"):
            if not self.option(name) > 0:
                raise ValueError(f"{name} must be > 0, got {self.option(name)}")
        registry.kind(self.attention)  # a one-line error naming the registered kinds
        if self.position not in POSITION_KINDS:
            raise ValueError(f"position must be one of {POSITION_KINDS}, got {self.position!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.position == "rotary" and (self.dim // self.heads) % 2:
            raise ValueError(f"rotary positions need an even head dimension, got {self.dim // self.heads}")
        if self.span.dynamic and not self.span.enabled:
            raise ValueError("span.dynamic needs span.enabled: true")
        if isinstance(self.memory.slots, bool) or not isinstance(self.memory.slots, int) or self.memory.slots < 0:
            raise ValueError(f"memory.slots must be a whole number >= 0, got {self.memory.slots!r}")
        if self.memory.replace_ffn and self.memory.slots == 0:
            raise ValueError("memory.replace_ffn (all-attention) needs memory.slots > 0")
        self.pkm.layers = [int(i) for i in self.pkm.layers]
        for i in self.pkm.layers:
            if not -self.depth <= i < self.depth:
                raise ValueError(f"pkm.layers entry {i} out of range for depth {self.depth}")
        if self.pkm.mode not in ("replace", "beside"):
            raise ValueError(f"pkm.mode must be replace|beside, got {self.pkm.mode!r}")
        if self.pkm.query_norm not in ("layernorm", "batchnorm"):
            raise ValueError(f"pkm.query_norm must be layernorm|batchnorm, got {self.pkm.query_norm!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def is_performer(self) -> bool:
        """Random-feature attention (projections to redraw; estimated, not exact, attention)."""
        return registry.kind(self.attention).random_features

    def option(self, name: str) -> Any:
        """The value of option ``name`` (``"dim"``, or a group's ``"span.max"``)."""
        value: Any = self
        for part in name.split("."):
            value = getattr(value, part)
        return value

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Every option as the command line names it under ``--model.config.`` (groups dotted)."""
        names = []
        for f in dataclasses.fields(cls):
            group = GROUPS.get(f.name)
            names += [f"{f.name}.{g.name}" for g in dataclasses.fields(group)] if group else [f.name]
        return tuple(names)

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict, groups nested (JSON / ``torch.load(weights_only=True)`` safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise so a typo is not silently ignored.

        Flat keys of older configs and checkpoints (:data:`FLAT_KEYS`) are translated, with a
        ``FutureWarning`` naming the new keys.
        """
        data, renamed = nest_flat_keys(data)
        if renamed:
            warnings.warn(deprecation_message(renamed), OldConfigNames, stacklevel=2)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**data)


def _group_from_dict(name: str, group: type, data: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(group)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown ModelConfig fields: {[f'{name}.{k}' for k in unknown]}")
    return group(**data)


def nest_flat_keys(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``data`` with its flat keys (:data:`FLAT_KEYS`) moved into their groups, and ``{old: new}``.

    A group given both ways (``span_max`` and ``span: {max: ...}``) keeps the nested value: it is
    the newer spelling, and a config merged from a flat base and a nested override means that.
    """
    renamed = {key: FLAT_KEYS[key] for key in data if key in FLAT_KEYS}
    if not renamed:
        return dict(data), {}
    out = {k: v for k, v in data.items() if k not in renamed}
    for old, new in renamed.items():
        group, field = new.split(".")
        nested = out.get(group)
        if not (nested is None or isinstance(nested, dict) or dataclasses.is_dataclass(nested)):
            raise ValueError(f"{group} must be a mapping of its options (e.g. {group}: {{...}}), got {nested!r}")
        nested = dict(dataclasses.asdict(nested) if dataclasses.is_dataclass(nested) else nested or {})
        nested.setdefault(field, data[old])
        out[group] = nested
    return out, renamed


def deprecation_message(renamed: dict[str, str]) -> str:
    """One line naming each flat option and its nested spelling, for a file or command a user writes."""
    pairs = ", ".join(f"{old} -> {new}" for old, new in renamed.items())
    return f"model.config options renamed (the old names still work for now; please update): {pairs}"


CHECKPOINT_NOTE = ("saved with the flat model.config names of older protein_lm versions (span_*, persistent_memory, "
                   "pkm_*); read as the nested span / memory / pkm groups, which files saved from it now use")


def flatten_options(data: dict[str, Any]) -> dict[str, Any]:
    """``{"dim": 64, "span": {"max": 8}}`` -> ``{"dim": 64, "span.max": 8}`` (flat old keys nested first)."""
    data, _ = nest_flat_keys(data)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in GROUPS and isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out
