"""What an anatomy is made of: modalities, attention and feed-forward blocks, layers.

These are plain frozen dataclasses: a declaration, checked against a real model by
:meth:`vlcompress.models.anatomy.Anatomy.validate`. They hold module *paths* (as given by
``model.named_modules()``), never modules, so one declaration serves every copy of a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = [
    "ATTENTION_KINDS",
    "ATTENTION_LAYOUTS",
    "AttentionSpec",
    "FFNSpec",
    "LayerSpec",
    "Modality",
    "OutputTemplate",
    "SlimSpec",
    "Stream",
    "default_depth_priority",
    "scaled",
]


class Modality(str, Enum):
    """Which stream a block belongs to (``HEAD`` is the task head)."""

    LANGUAGE = "language"
    VISION = "vision"
    CROSS = "cross"
    HEAD = "head"


ATTENTION_KINDS = ("self", "cross")
"""``self``: queries and keys come from the same stream; ``cross``: from two streams."""

ATTENTION_LAYOUTS = ("separate", "fused", "packed")
"""How the q/k/v projections are stored:

* ``separate`` — three ``nn.Linear`` (BERT ``query``/``key``/``value``, CLIP ``q_proj``...);
* ``fused`` — one ``nn.Linear`` whose output is ``[q | k | v]``, each head-major (timm ``qkv``);
* ``packed`` — an ``nn.MultiheadAttention`` (``in_proj_weight`` rows ``[q | k | v]``, its
  ``out_proj`` used functionally).
"""


def _check_choice(owner: str, field_name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}: {field_name} must be one of {allowed}, got {value!r}.")


@dataclass(frozen=True)
class AttentionSpec:
    """One multi-head attention block.

    The head layout is the usual one: head ``h`` owns rows ``h*head_dim : (h+1)*head_dim`` of
    each of the q, k and v projections and the same columns of the output projection.

    Attributes:
        name: module path of the attention block (the module whose forward runs the whole
            attention, output projection included).
        num_heads: number of heads.
        head_dim: size of one head.
        q, k, v: module paths of the projections. ``separate``: three ``nn.Linear``;
            ``fused``: all three name the one ``qkv`` ``nn.Linear``; ``packed``: all three name
            the ``nn.MultiheadAttention``.
        out: module path of the output ``nn.Linear`` (its input is the heads, head-major).
        modality: the group the block belongs to (what a per-modality sparsity applies to);
            inside a cross-modal layer this is :attr:`Modality.CROSS` even for a block that
            reads one stream only.
        kind: ``"self"`` or ``"cross"``.
        query_side: modality of the stream the queries come from (default: ``modality``).
        key_side: modality of the stream the keys and values come from (default:
            ``query_side``).
        bidirectional: the same block is called in both directions (LXMERT's shared
            cross-attention: language queries on vision keys, then vision on language).
        layout: ``"separate"``, ``"fused"`` or ``"packed"`` (see :data:`ATTENTION_LAYOUTS`).

    Raises:
        ValueError: for an unknown ``kind`` or ``layout``, a non-positive size, or a fused /
            packed block whose q, k and v paths differ.

    Example::

        AttentionSpec("blocks.0.attn", 12, 64, "blocks.0.attn.qkv", "blocks.0.attn.qkv",
                      "blocks.0.attn.qkv", "blocks.0.attn.proj", Modality.VISION,
                      layout="fused")
    """

    name: str
    num_heads: int
    head_dim: int
    q: str
    k: str
    v: str
    out: str
    modality: Modality
    kind: str = "self"
    query_side: Modality | None = None
    key_side: Modality | None = None
    bidirectional: bool = False
    layout: str = "separate"

    def __post_init__(self) -> None:
        owner = f"AttentionSpec {self.name!r}"
        _check_choice(owner, "kind", self.kind, ATTENTION_KINDS)
        _check_choice(owner, "layout", self.layout, ATTENTION_LAYOUTS)
        if self.num_heads < 1 or self.head_dim < 1:
            raise ValueError(
                f"{owner}: num_heads and head_dim must be positive, got "
                f"{self.num_heads} and {self.head_dim}."
            )
        if self.layout != "separate" and not (self.q == self.k == self.v):
            raise ValueError(
                f"{owner}: a {self.layout} block has one projection module; give the same "
                f"path for q, k and v (got {self.q!r}, {self.k!r}, {self.v!r})."
            )
        modality = Modality(self.modality)
        object.__setattr__(self, "modality", modality)
        query = Modality(self.query_side) if self.query_side is not None else modality
        key = Modality(self.key_side) if self.key_side is not None else query
        object.__setattr__(self, "query_side", query)
        object.__setattr__(self, "key_side", key)

    @property
    def width(self) -> int:
        """``num_heads * head_dim``: the size of the concatenated heads."""
        return self.num_heads * self.head_dim

    @property
    def projections(self) -> tuple[str, ...]:
        """The distinct projection module paths (``q``, ``k``, ``v``, ``out`` deduplicated)."""
        return tuple(dict.fromkeys((self.q, self.k, self.v, self.out)))


@dataclass(frozen=True)
class FFNSpec:
    """One feed-forward block: ``down(act(up(x)))``.

    Attributes:
        name: name of the block (a module path, or a logical name when the block spans
            several modules, as in BERT's ``intermediate`` + ``output``).
        up: path of the ``nn.Linear`` hidden -> inner.
        down: path of the ``nn.Linear`` inner -> hidden (its input holds the FFN units).
        inner_dim: number of units (neurons).
        modality: the group the block belongs to (see :attr:`AttentionSpec.modality`).
        side: modality of the stream it transforms (default: ``modality``).

    Raises:
        ValueError: for a non-positive ``inner_dim``.
    """

    name: str
    up: str
    down: str
    inner_dim: int
    modality: Modality
    side: Modality | None = None

    def __post_init__(self) -> None:
        if self.inner_dim < 1:
            raise ValueError(f"FFNSpec {self.name!r}: inner_dim must be positive.")
        object.__setattr__(self, "modality", Modality(self.modality))
        side = Modality(self.side) if self.side is not None else self.modality
        object.__setattr__(self, "side", side)


@dataclass(frozen=True)
class Stream:
    """Marks where hidden-state stream ``index`` goes in a layer's output.

    Used in :attr:`LayerSpec.output`: ``Stream(0)`` for a layer returning its hidden states
    bare, ``(Stream(0), None)`` for one returning ``(hidden_states, attention_weights)``,
    ``(Stream(0), Stream(1))`` for a two-stream layer returning both streams.
    """

    index: int


OutputTemplate = Stream | None | tuple | list | dict
"""The structure of a layer's output: a :class:`Stream`, ``None`` (an output a skipped layer
does not produce, e.g. attention weights) or a tuple / list / dict of templates."""


def _check_template(owner: str, template: Any, num_streams: int) -> None:
    if template is None:
        return
    if isinstance(template, Stream):
        if not 0 <= template.index < num_streams:
            raise ValueError(
                f"{owner}: output refers to stream {template.index} but the layer declares "
                f"{num_streams} stream(s)."
            )
        return
    if isinstance(template, (tuple, list)):
        for item in template:
            _check_template(owner, item, num_streams)
        return
    if isinstance(template, dict):
        for item in template.values():
            _check_template(owner, item, num_streams)
        return
    raise ValueError(
        f"{owner}: output template items must be Stream, None, tuple, list or dict; got "
        f"{type(template).__name__}."
    )


@dataclass(frozen=True)
class LayerSpec:
    """One transformer layer (the unit that skipping and depth slimming remove).

    Attributes:
        name: module path of the layer.
        stack: name of the ordered stack it belongs to (e.g. ``"encoder.layer"``).
        index: position in that stack.
        modality: the group it belongs to (language / vision / cross).
        attentions: names of its attention blocks (:attr:`AttentionSpec.name`).
        ffns: names of its feed-forward blocks (:attr:`FFNSpec.name`).
        streams: the inputs of ``forward`` that carry the hidden states the layer updates, each
            a positional index or a parameter name (``("lang_feats", "visual_feats")`` for
            LXMERT's two-stream cross layer). A bypassed layer passes these through.
        stream_sides: modality of each stream (default: ``modality`` for every stream).
        output: where the streams go in the layer's output (an :data:`OutputTemplate`);
            ``None`` = not declared: learned by :meth:`Anatomy.learn_calls` or, lazily, by the
            bypass on its first call.

    Raises:
        ValueError: for no streams, ``stream_sides`` of the wrong length or an ``output`` that
            names a stream the layer does not have.
    """

    name: str
    stack: str
    index: int
    modality: Modality
    attentions: tuple[str, ...] = ()
    ffns: tuple[str, ...] = ()
    streams: tuple[int | str, ...] = (0,)
    stream_sides: tuple[Modality, ...] | None = None
    output: Any = None

    def __post_init__(self) -> None:
        owner = f"LayerSpec {self.name!r}"
        object.__setattr__(self, "modality", Modality(self.modality))
        object.__setattr__(self, "attentions", tuple(self.attentions))
        object.__setattr__(self, "ffns", tuple(self.ffns))
        streams = (self.streams,) if isinstance(self.streams, (int, str)) else self.streams
        object.__setattr__(self, "streams", tuple(streams))
        if not self.streams:
            raise ValueError(f"{owner}: declare at least one stream (e.g. streams=(0,)).")
        sides = self.stream_sides or (self.modality,) * len(self.streams)
        if len(sides) != len(self.streams):
            raise ValueError(
                f"{owner}: {len(self.streams)} stream(s) {self.streams} but "
                f"{len(sides)} stream_sides {sides}."
            )
        object.__setattr__(self, "stream_sides", tuple(Modality(s) for s in sides))
        _check_template(owner, self.output, len(self.streams))

    @property
    def num_streams(self) -> int:
        """How many hidden-state streams the layer carries (2 for co-attention layers)."""
        return len(self.streams)


@dataclass(frozen=True)
class SlimSpec:
    """Where a model's hidden width lives, for width slimming (and its depth order).

    Width slimming runs a model at width ``w`` by using only the first ``⌊n·w⌋`` outputs of
    every ``nn.Linear`` / ``nn.Embedding`` in :attr:`region` (attention projections by whole
    heads, FFN up projections by units). Every ``nn.Linear`` and ``nn.LayerNorm`` of the model
    reads as many input features as it is given, so modules outside the region that read the
    slimmed stream (a task head) adapt on their own.

    Attributes:
        region: module path prefixes whose ``nn.Linear`` / ``nn.Embedding`` outputs scale with
            the width (``""`` = the whole model).
        fixed: module paths inside :attr:`region` whose outputs keep their full size (an
            attention-pooling scorer with one output per glimpse, say).
        params: parameters added directly to the slimmed stream (a learned position
            embedding): the model applies them as ``param[..., : x.shape[-1]]``; an export
            keeps their first ``⌊n·w⌋`` entries of the last dimension.
        depth_priority: per stack (as in :attr:`Anatomy.stacks`), the order in which layers
            are kept when the depth shrinks (keep the first ``k``, run them in index order);
            stacks not listed use :func:`default_depth_priority`.

    Raises:
        ValueError: for a priority that is not a permutation of the stack's indices (checked
            against the model by :meth:`Anatomy.validate`).
    """

    region: tuple[str, ...] = ("",)
    fixed: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    depth_priority: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("region", "fixed", "params"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        prio = {s: tuple(int(i) for i in p) for s, p in self.depth_priority.items()}
        for stack, order in prio.items():
            if sorted(order) != list(range(len(order))):
                raise ValueError(
                    f"SlimSpec: depth_priority[{stack!r}] = {list(order)} must be a permutation "
                    f"of 0..{len(order) - 1}."
                )
        object.__setattr__(self, "depth_priority", prio)

    def in_region(self, path: str) -> bool:
        """Whether module ``path`` is in :attr:`region` and not :attr:`fixed`."""

        def under(prefix: str) -> bool:
            return prefix == "" or path == prefix or path.startswith(prefix + ".")

        return any(map(under, self.region)) and not any(
            path == f or path.startswith(f + ".") for f in self.fixed
        )

    def prefixed(self, prefix: str) -> SlimSpec:
        """The same spec for a model that holds this one's model at ``prefix``."""

        def p(path: str) -> str:
            return f"{prefix}.{path}" if prefix and path else prefix or path

        return SlimSpec(
            tuple(map(p, self.region)),
            tuple(map(p, self.fixed)),
            tuple(map(p, self.params)),
            {p(s): o for s, o in self.depth_priority.items()},
        )


def scaled(n: int, fraction: float) -> int:
    """``⌊n · fraction⌋``, at least 1: the size of a dimension slimmed to ``fraction``."""
    return max(1, int(n * fraction + 1e-9))


def default_depth_priority(num_layers: int) -> tuple[int, ...]:
    """Keep the ends first, then work inwards: ``0, L-1, 1, L-2, ...`` (BST's encoder order
    ``[0, 5, 1, 4, 2, 3]`` for 6 layers)."""
    order: list[int] = []
    lo, hi = 0, num_layers - 1
    while lo <= hi:
        order.append(lo)
        if hi != lo:
            order.append(hi)
        lo, hi = lo + 1, hi - 1
    return tuple(order)
