"""The anatomy: how a model declares its structure so that every callback can work on it.

A callback never imports a concrete model. It asks :func:`anatomy_of` for the model's
:class:`Anatomy` and acts through it:

* pruning — :meth:`Anatomy.prunable_weights` (weights per modality), :meth:`Anatomy.mask_heads`
  (whole attention heads), :meth:`Anatomy.mask_ffn_units` (feed-forward neurons);
* slimming — heads and FFN units by the same masks (width), :attr:`Anatomy.stacks` (ordered
  layers) with :meth:`Anatomy.replace_layer` (depth);
* skipping — :meth:`Anatomy.replace_layer` with an adapter (:class:`LayerBypass`);
* distillation — :meth:`Anatomy.capture` reads hidden states at the declared read-out points.

Models we wrote declare their anatomy (``model.anatomy()``); for other models it is built from
module-name patterns (:func:`anatomy_from_patterns`), and Hugging Face BERT-style encoders are
recognised automatically (:data:`BERT_PATTERNS`).
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import nn

__all__ = [
    "Modality",
    "AttentionSpec",
    "FFNSpec",
    "LayerSpec",
    "Anatomy",
    "AnatomyPatterns",
    "LayerBypass",
    "BERT_PATTERNS",
    "anatomy_from_patterns",
    "anatomy_of",
]


class Modality(str, Enum):
    """Which stream a block belongs to."""

    LANGUAGE = "language"
    VISION = "vision"
    CROSS = "cross"
    HEAD = "head"


@dataclass(frozen=True)
class AttentionSpec:
    """One multi-head attention block.

    Attributes:
        name: module path of the attention block.
        num_heads: number of heads.
        head_dim: size of one head.
        q, k, v, out: module paths of the query/key/value/output ``nn.Linear`` projections; the
            output projection's input is the concatenation of the heads (head-major).
        modality: the stream it belongs to.
        kind: ``"self"`` or ``"cross"`` attention.
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


@dataclass(frozen=True)
class FFNSpec:
    """One feed-forward block: ``down(act(up(x)))``.

    Attributes:
        name: name of the block (a module path, or a logical name when the block spans
            several modules, as in BERT).
        up: path of the ``nn.Linear`` hidden -> inner.
        down: path of the ``nn.Linear`` inner -> hidden (its input holds the FFN units).
        inner_dim: number of units (neurons).
        modality: the stream it belongs to.
    """

    name: str
    up: str
    down: str
    inner_dim: int
    modality: Modality


@dataclass(frozen=True)
class LayerSpec:
    """One transformer layer.

    Attributes:
        name: module path of the layer.
        stack: name of the ordered stack it belongs to (e.g. ``"encoder"``).
        index: position in that stack.
        modality: the stream it belongs to.
        attentions: paths of its attention blocks.
        ffns: paths of its feed-forward blocks.
        hidden_arg: which positional argument of ``forward`` carries the hidden states that
            the layer updates (a bypassed layer returns it).
        returns_tuple: True when ``forward`` returns a tuple whose first item is the hidden
            states (Hugging Face style).
    """

    name: str
    stack: str
    index: int
    modality: Modality
    attentions: tuple[str, ...] = ()
    ffns: tuple[str, ...] = ()
    hidden_arg: int = 0
    returns_tuple: bool = False


class LayerBypass(nn.Module):
    """Stands in for a skipped layer: returns its hidden-state input, optionally through ``adapter``.

    Args:
        adapter: module applied to the hidden states (``None`` = identity, the layer is dropped).
        hidden_arg: which positional argument carries the hidden states.
        returns_tuple: wrap the output in a 1-tuple (for layers that return tuples).
    """

    def __init__(
        self, adapter: nn.Module | None = None, hidden_arg: int = 0, returns_tuple: bool = False
    ) -> None:
        super().__init__()
        self.adapter = adapter
        self.hidden_arg = hidden_arg
        self.returns_tuple = returns_tuple

    def forward(self, *args, **kwargs):  # noqa: D102 - documented on the class
        if len(args) > self.hidden_arg:
            x = args[self.hidden_arg]
        else:
            x = kwargs.get("hidden_states", kwargs.get("x"))
        if self.adapter is not None:
            x = self.adapter(x)
        return (x,) if self.returns_tuple else x


def _gate_hook(mask: torch.Tensor, group: int) -> Callable:
    """Forward pre-hook multiplying the last dim of the input by ``mask`` repeated ``group`` times."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        m = mask.to(device=x.device, dtype=x.dtype).repeat_interleave(group)
        return (x * m, *args[1:])

    return hook


class _AttributeHandle:
    """Undo handle for an attribute set on a module (mirrors ``RemovableHandle.remove``)."""

    def __init__(self, module: nn.Module, name: str, restore: Any) -> None:
        self.module, self.name, self.restore = module, name, restore

    def remove(self) -> None:
        setattr(self.module, self.name, self.restore)


@dataclass
class Anatomy:
    """A model's declared structure: layers, attention and FFN blocks, modalities, read-outs.

    Attributes:
        layers: every transformer layer.
        attentions: every attention block.
        ffns: every feed-forward block.
        stacks: ordered layer paths per stack (the order in which they run).
        readouts: named module paths whose outputs are hidden states to read.
        extra_weights: per modality, parameter names outside the layers that pruning may mask
            (embeddings, input projections, pooler).
        head_modules: module paths of the task head (never pruned by default).
    """

    layers: list[LayerSpec] = field(default_factory=list)
    attentions: list[AttentionSpec] = field(default_factory=list)
    ffns: list[FFNSpec] = field(default_factory=list)
    stacks: dict[str, list[str]] = field(default_factory=dict)
    readouts: dict[str, str] = field(default_factory=dict)
    extra_weights: dict[Modality, list[str]] = field(default_factory=dict)
    head_modules: list[str] = field(default_factory=list)

    # ------------------------------------------------------------ look-ups
    def attention(self, name: str) -> AttentionSpec:
        """The attention block called ``name``."""
        for a in self.attentions:
            if a.name == name:
                return a
        raise KeyError(f"no attention block {name!r}; known: {[a.name for a in self.attentions]}")

    def ffn(self, name: str) -> FFNSpec:
        """The feed-forward block called ``name``."""
        for f in self.ffns:
            if f.name == name:
                return f
        raise KeyError(f"no FFN block {name!r}; known: {[f.name for f in self.ffns]}")

    def layer(self, name: str) -> LayerSpec:
        """The layer called ``name``."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r}; known: {[x.name for x in self.layers]}")

    def validate(self, model: nn.Module) -> None:
        """Check that every declared path exists and projections have consistent shapes.

        Raises:
            ValueError: naming every declared path that is missing or inconsistent.
        """
        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        problems = []
        for a in self.attentions:
            for p in (a.name, a.q, a.k, a.v, a.out):
                if p not in modules:
                    problems.append(f"attention path {p!r} not in the model")
            if a.out in modules and isinstance(modules[a.out], nn.Linear):
                if modules[a.out].in_features != a.num_heads * a.head_dim:
                    problems.append(
                        f"{a.out}: in_features {modules[a.out].in_features} != heads x head_dim "
                        f"{a.num_heads}x{a.head_dim}"
                    )
        for f in self.ffns:
            for p in (f.up, f.down):
                if p not in modules:
                    problems.append(f"FFN path {p!r} not in the model")
        for layer in self.layers:
            if layer.name not in modules:
                problems.append(f"layer path {layer.name!r} not in the model")
        for p in self.readouts.values():
            if p not in modules:
                problems.append(f"read-out path {p!r} not in the model")
        for names in self.extra_weights.values():
            problems += [f"weight {n!r} not in the model" for n in names if n not in params]
        if problems:
            raise ValueError("anatomy does not match the model:\n  " + "\n  ".join(problems))

    # ------------------------------------------------------------ pruning
    def prunable_weights(self, model: nn.Module) -> dict[Modality, dict[str, nn.Parameter]]:
        """Maskable weight matrices per modality: every ``nn.Linear`` weight inside a layer,
        plus the declared extra weights. Biases, norms and the task head are never included."""
        params = dict(model.named_parameters())
        out: dict[Modality, dict[str, nn.Parameter]] = {m: {} for m in Modality}
        for layer in self.layers:
            mod = model.get_submodule(layer.name)
            for sub_name, sub in mod.named_modules():
                if isinstance(sub, nn.Linear):
                    full = f"{layer.name}.{sub_name}.weight" if sub_name else f"{layer.name}.weight"
                    out[layer.modality][full] = params[full]
        for modality, names in self.extra_weights.items():
            for n in names:
                out[modality][n] = params[n]
        return {m: w for m, w in out.items() if w}

    def mask_heads(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> list[Any]:
        """Switch attention heads off: ``masks[attention_name]`` is a ``(num_heads,)`` 0/1
        tensor. The heads' outputs are zeroed before the output projection (so they get no
        gradient either). Attention modules with ``supports_head_mask`` receive the mask
        themselves (their kernel then skips the dead heads); others get a hook on the output
        projection. Returns handles; ``handle.remove()`` switches the heads back on."""
        handles: list[Any] = []
        for name, mask in masks.items():
            spec = self.attention(name)
            if mask.shape != (spec.num_heads,):
                raise ValueError(
                    f"head mask for {name} must have shape ({spec.num_heads},), got {tuple(mask.shape)}"
                )
            module = model.get_submodule(spec.name)
            if getattr(module, "supports_head_mask", False):
                handles.append(_AttributeHandle(module, "head_mask", module.head_mask))
                module.head_mask = mask
                continue
            out = model.get_submodule(spec.out)
            handles.append(out.register_forward_pre_hook(_gate_hook(mask, spec.head_dim)))
        return handles

    def mask_ffn_units(
        self, model: nn.Module, masks: dict[str, torch.Tensor]
    ) -> list[torch.utils.hooks.RemovableHandle]:
        """Switch FFN units off: ``masks[ffn_name]`` is an ``(inner_dim,)`` 0/1 tensor."""
        handles = []
        for name, mask in masks.items():
            spec = self.ffn(name)
            if mask.shape != (spec.inner_dim,):
                raise ValueError(
                    f"unit mask for {name} must have shape ({spec.inner_dim},), got {tuple(mask.shape)}"
                )
            down = model.get_submodule(spec.down)
            handles.append(down.register_forward_pre_hook(_gate_hook(mask, 1)))
        return handles

    # ------------------------------------------------------------ depth / skipping
    def replace_layer(self, model: nn.Module, name: str, replacement: nn.Module) -> nn.Module:
        """Put ``replacement`` where layer ``name`` is; returns the original layer."""
        self.layer(name)  # raises on unknown names
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        original = getattr(parent, child) if not child.isdigit() else parent[int(child)]
        if child.isdigit():
            parent[int(child)] = replacement
        else:
            setattr(parent, child, replacement)
        return original

    def bypass_layer(
        self, model: nn.Module, name: str, adapter: nn.Module | None = None
    ) -> nn.Module:
        """Skip layer ``name`` (optionally through ``adapter``); returns the original layer."""
        spec = self.layer(name)
        return self.replace_layer(
            model, name, LayerBypass(adapter, spec.hidden_arg, spec.returns_tuple)
        )

    # ------------------------------------------------------------ distillation
    @contextlib.contextmanager
    def capture(
        self, model: nn.Module, names: list[str] | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Context manager collecting the outputs of the read-out points during forward passes.

        Example::

            with anatomy.capture(model) as states:
                model(batch)
            states["encoder.5"]  # (B, T, D)
        """
        states: dict[str, torch.Tensor] = {}
        handles = []
        for key in names or list(self.readouts):
            if key not in self.readouts:
                raise KeyError(f"no read-out {key!r}; known: {sorted(self.readouts)}")

            def hook(_m, _a, output, key=key):
                states[key] = output[0] if isinstance(output, tuple) else output

            handles.append(model.get_submodule(self.readouts[key]).register_forward_hook(hook))
        try:
            yield states
        finally:
            for h in handles:
                h.remove()


# ---------------------------------------------------------------------- patterns
@dataclass(frozen=True)
class AnatomyPatterns:
    """Module-name patterns describing a model we did not write.

    ``layer`` is a regex over module names with a named group ``index``; the other fields are
    paths relative to a layer. ``modality`` maps a regex over the layer path to a modality
    (first match wins; default language).

    Attributes:
        layer: regex matching layer module paths, with ``(?P<index>\\d+)``.
        attention, q, k, v, out: relative paths of the attention block and its projections.
        ffn_up, ffn_down: relative paths of the FFN projections.
        num_heads_attr: attribute of the attention module (or of the model config) giving
            the head count.
        modality: ``[(regex, Modality)]``.
        returns_tuple: layers return tuples; ``None`` = read it from the layer's ``forward``
            return annotation (Hugging Face changed it between major versions).
    """

    layer: str
    attention: str
    q: str
    k: str
    v: str
    out: str
    ffn_up: str
    ffn_down: str
    num_heads_attr: str = "num_attention_heads"
    modality: tuple[tuple[str, Modality], ...] = ()
    returns_tuple: bool | None = False


BERT_PATTERNS = AnatomyPatterns(
    layer=r"^(?:.*\.)?encoder\.layer\.(?P<index>\d+)$",
    attention="attention",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    out="attention.output.dense",
    ffn_up="intermediate.dense",
    ffn_down="output.dense",
    num_heads_attr="num_attention_heads",
    returns_tuple=None,
)
"""Hugging Face BERT-style encoders (BERT, RoBERTa, MiniLM, ...)."""


def _num_heads(model: nn.Module, attention: nn.Module, attr: str) -> int:
    for obj in (attention, *attention.modules(), getattr(model, "config", None)):
        if obj is not None and isinstance(getattr(obj, attr, None), int):
            return getattr(obj, attr)
    raise ValueError(
        f"cannot find the head count: no integer attribute {attr!r} on the attention module, "
        "its children or model.config; set AnatomyPatterns.num_heads_attr."
    )


def _returns_tuple(layer: nn.Module) -> bool:
    ann = inspect.signature(type(layer).forward).return_annotation
    return ann is not inspect.Signature.empty and "tuple" in str(ann).lower()


def anatomy_from_patterns(model: nn.Module, patterns: AnatomyPatterns) -> Anatomy:
    """Build an :class:`Anatomy` for ``model`` from module-name ``patterns``.

    Raises:
        ValueError: when no module matches ``patterns.layer`` or a relative path is missing.
    """
    rx = re.compile(patterns.layer)
    anatomy = Anatomy()
    modules = dict(model.named_modules())
    for name in modules:
        m = rx.match(name)
        if not m:
            continue
        stack = name[: m.start("index")].rstrip(".") or "layers"
        modality = next(
            (mod for pat, mod in patterns.modality if re.search(pat, name)), Modality.LANGUAGE
        )
        p = {
            k: f"{name}.{getattr(patterns, k)}"
            for k in ("attention", "q", "k", "v", "out", "ffn_up", "ffn_down")
        }
        missing = [v for v in p.values() if v not in modules]
        if missing:
            raise ValueError(f"layer {name!r} matches the layer pattern but lacks {missing}")
        heads = _num_heads(model, modules[p["attention"]], patterns.num_heads_attr)
        out = modules[p["out"]]
        anatomy.attentions.append(
            AttentionSpec(
                p["attention"],
                heads,
                out.in_features // heads,
                p["q"],
                p["k"],
                p["v"],
                p["out"],
                modality,
            )
        )
        anatomy.ffns.append(
            FFNSpec(
                f"{name}.ffn",
                p["ffn_up"],
                p["ffn_down"],
                modules[p["ffn_up"]].out_features,
                modality,
            )
        )
        anatomy.layers.append(
            LayerSpec(name, stack, int(m.group("index")), modality, (p["attention"],), (f"{name}.ffn",),
                      returns_tuple=_returns_tuple(modules[name]) if patterns.returns_tuple is None else patterns.returns_tuple)
        )  # fmt: skip
        anatomy.stacks.setdefault(stack, []).append(name)
        anatomy.readouts[name] = name
    if not anatomy.layers:
        raise ValueError(
            f"no module of {type(model).__name__} matches the layer pattern {patterns.layer!r}"
        )
    for names in anatomy.stacks.values():
        names.sort(key=lambda n: anatomy.layer(n).index)
    return anatomy


def _is_bert_like(model: nn.Module) -> bool:
    names = {n for n, _ in model.named_modules()}
    return any(re.match(BERT_PATTERNS.layer, n) for n in names) and any(
        n.endswith("attention.self.query") for n in names
    )


def anatomy_of(model: nn.Module, patterns: AnatomyPatterns | None = None) -> Anatomy:
    """The anatomy of ``model``: its own declaration, one built from ``patterns``, or the
    automatic one for Hugging Face BERT-style encoders.

    Raises:
        TypeError: when the model declares nothing, no patterns are given, and it is not
            recognised.
    """
    if patterns is not None:
        return anatomy_from_patterns(model, patterns)
    declare = getattr(model, "anatomy", None)
    if callable(declare):
        return declare()
    if _is_bert_like(model):
        return anatomy_from_patterns(model, BERT_PATTERNS)
    raise TypeError(
        f"{type(model).__name__} declares no anatomy: give it an `anatomy()` method returning "
        "vlcompress.models.anatomy.Anatomy, or pass AnatomyPatterns describing its layer names "
        "(see BERT_PATTERNS for an example)."
    )
