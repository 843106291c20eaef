"""Anatomies of models we did not write, from module-name patterns."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from vlcompress.models.anatomy.core import Anatomy, prunable_weights_in
from vlcompress.models.anatomy.specs import (
    ATTENTION_LAYOUTS,
    AttentionSpec,
    FFNSpec,
    LayerSpec,
    Modality,
)

__all__ = ["BERT_PATTERNS", "AnatomyPatterns", "anatomy_from_patterns", "num_heads_of"]

_HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_head", "n_heads", "heads")


@dataclass(frozen=True)
class AnatomyPatterns:
    """Module-name patterns describing a model's transformer layers.

    ``layer`` is a regex over module names with a named group ``index``; the other paths are
    relative to a layer. One attention block and one FFN block per layer.

    Attributes:
        layer: regex matching layer module paths, with ``(?P<index>\\d+)``.
        attention: relative path of the attention block.
        q, k, v, out: relative paths of the projections (``fused``: q, k and v name the one
            ``qkv`` Linear; ``packed``: they name the ``nn.MultiheadAttention``).
        ffn_up, ffn_down: relative paths of the FFN projections.
        num_heads_attr: attribute of the attention module (or one of its children, or the model
            config) giving the head count; common names are tried after it.
        modality: ``[(regex over the layer path, Modality)]``, first match wins (default
            language).
        layout: ``"separate"``, ``"fused"`` or ``"packed"``.
        streams: the layers' hidden-state inputs (see :attr:`LayerSpec.streams`).
        output: the layers' output template (``None``: learned; see :attr:`LayerSpec.output`).
        extra_modules: ``[(regex over module paths, Modality)]``: modules outside the layers
            that belong to a modality (embeddings, norms, pooler); their weight matrices
            (not position / type embeddings) become prunable extra weights.
        head_modules: regexes of task-head module paths.

    Raises:
        ValueError: for an unknown layout or a layer regex without ``(?P<index>...)``.
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
    layout: str = "separate"
    streams: tuple[int | str, ...] = (0,)
    output: Any = None
    extra_modules: tuple[tuple[str, Modality], ...] = ()
    head_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.layout not in ATTENTION_LAYOUTS:
            raise ValueError(f"layout must be one of {ATTENTION_LAYOUTS}, got {self.layout!r}.")
        if "(?P<index>" not in self.layer:
            raise ValueError(
                f"the layer pattern {self.layer!r} needs a group (?P<index>\\d+) for the "
                "position of each layer in its stack."
            )


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
    extra_modules=((r"^(?:.*\.)?embeddings$", Modality.LANGUAGE),
                   (r"^(?:.*\.)?pooler$", Modality.LANGUAGE)),
)  # fmt: skip
"""Hugging Face BERT-style encoders (BERT, RoBERTa, MiniLM, ELECTRA, ...)."""


def num_heads_of(model: nn.Module, attention: nn.Module, attr: str = "num_attention_heads") -> int:
    """The head count of ``attention``: integer attribute ``attr`` (or a common name) of the
    module, of one of its children, or of ``model.config``, in that order.

    Args:
        model: the model (its ``config`` is the last resort).
        attention: the attention module.
        attr: the attribute to try first.

    Returns:
        The head count.

    Raises:
        ValueError: when none is found (name the attribute in ``AnatomyPatterns.num_heads_attr``).
    """
    names = (attr, *_HEAD_ATTRS)
    config = getattr(model, "config", None)
    for obj in (attention, *attention.modules(), config):
        for name in names:
            value = getattr(obj, name, None) if obj is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    raise ValueError(
        f"cannot find the head count of {type(attention).__name__}: no integer attribute "
        f"{attr!r} (nor {list(_HEAD_ATTRS)}) on the module, its children or model.config; "
        "set AnatomyPatterns.num_heads_attr."
    )


def _head_dim(layout: str, heads: int, out: nn.Module, proj: nn.Module) -> int:
    if layout == "packed":
        return proj.embed_dim // heads
    if layout == "fused":
        return proj.out_features // 3 // heads
    return out.in_features // heads


def anatomy_from_patterns(model: nn.Module, patterns: AnatomyPatterns) -> Anatomy:
    """Build an :class:`Anatomy` for ``model`` from module-name ``patterns``.

    Args:
        model: the model.
        patterns: its module names.

    Returns:
        The anatomy: one stack per distinct layer-path prefix, one attention block
        (``<layer>.<attention>``) and one FFN block (``<layer>.ffn``) per layer, a read-out per
        layer.

    Raises:
        ValueError: when no module matches ``patterns.layer`` or a matching layer lacks a
            relative path.

    Example::

        patterns = AnatomyPatterns(layer=r"^blocks\\.(?P<index>\\d+)$", attention="attn",
                                   q="attn.qkv", k="attn.qkv", v="attn.qkv", out="attn.proj",
                                   ffn_up="mlp.fc1", ffn_down="mlp.fc2", layout="fused")
        anatomy = anatomy_from_patterns(model, patterns)
    """
    rx = re.compile(patterns.layer)
    anatomy = Anatomy()
    modules = dict(model.named_modules())
    found = []
    for name in modules:
        m = rx.match(name)
        if m:
            found.append((name, m))
    if not found:
        raise ValueError(
            f"no module of {type(model).__name__} matches the layer pattern {patterns.layer!r}"
        )
    for name, m in sorted(
        found, key=lambda nm: (nm[0][: nm[1].start("index")], int(nm[1]["index"]))
    ):
        stack = name[: m.start("index")].rstrip(".") or "layers"
        modality = next(
            (mod for pat, mod in patterns.modality if re.search(pat, name)), Modality.LANGUAGE
        )
        rel = ("attention", "q", "k", "v", "out", "ffn_up", "ffn_down")
        p = {k: f"{name}.{getattr(patterns, k)}" for k in rel}
        missing = sorted({v for v in p.values() if v not in modules})
        if missing:
            raise ValueError(
                f"layer {name!r} matches the layer pattern but lacks {missing}; fix the "
                "relative paths of the AnatomyPatterns."
            )
        heads = num_heads_of(model, modules[p["attention"]], patterns.num_heads_attr)
        head_dim = _head_dim(patterns.layout, heads, modules[p["out"]], modules[p["v"]])
        attention = AttentionSpec(
            p["attention"], heads, head_dim, p["q"], p["k"], p["v"], p["out"], modality,
            layout=patterns.layout,
        )  # fmt: skip
        ffn = FFNSpec(
            f"{name}.ffn", p["ffn_up"], p["ffn_down"], modules[p["ffn_up"]].out_features, modality
        )
        anatomy.attentions.append(attention)
        anatomy.ffns.append(ffn)
        anatomy.add_layer(
            LayerSpec(
                name,
                stack,
                int(m["index"]),
                modality,
                (attention.name,),
                (ffn.name,),
                streams=patterns.streams,
                output=patterns.output,
            )  # fmt: skip
        )
    layer_prefixes = tuple(f"{x.name}." for x in anatomy.layers)
    for pattern, modality in patterns.extra_modules:
        for path in modules:
            if path and re.search(pattern, path) and not path.startswith(layer_prefixes):
                anatomy.extra_modules.setdefault(modality, []).append(path)
                anatomy.extra_weights.setdefault(modality, []).extend(
                    prunable_weights_in(modules[path], path)
                )
    for pattern in patterns.head_modules:
        anatomy.head_modules += [p for p in modules if p and re.search(pattern, p)]
    return anatomy
