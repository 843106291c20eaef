"""Automatic anatomies for the Hugging Face and timm models of our roadmap.

:func:`anatomy_of` asks the model for its own declaration (``model.anatomy()``), else looks
for recognised models inside it (by class name, so neither transformers nor timm is imported
here), else tries the BERT-style module names. It then measures the coverage and warns (or
raises) when the anatomy leaves a large share of the parameters undeclared.

Recognised: ``BertModel``, ``RobertaModel`` (and BERT-style encoders by name),
``LxmertModel``, ``VisualBertModel``, ``ViltModel``, ``CLIPTextModel``, ``CLIPVisionModel``,
``CLIPModel`` (and the ``...WithProjection`` towers), ``BridgeTowerModel`` (and its text and
vision models), timm
``VisionTransformer``; wrapped anywhere in a bigger module (``BertForSequenceClassification``,
``ViltForQuestionAnswering``, a LightningModule holding one, ...). Recognisers for more
classes can be added with :func:`register_recogniser`.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from vlcompress.models.anatomy.core import Anatomy, prunable_weights_in
from vlcompress.models.anatomy.patterns import (
    BERT_PATTERNS,
    AnatomyPatterns,
    _head_dim,
    anatomy_from_patterns,
    num_heads_of,
)
from vlcompress.models.anatomy.specs import AttentionSpec, FFNSpec, LayerSpec, Modality, Stream

__all__ = ["RECOGNISERS", "TASK_HEAD_NAMES", "anatomy_of", "recognise", "register_recogniser"]

log = logging.getLogger(__name__)

Recogniser = Callable[[nn.Module], Anatomy]

RECOGNISERS: dict[str, Recogniser] = {}
"""Class name -> function building the anatomy of an instance (paths relative to it)."""

TASK_HEAD_NAMES = frozenset(
    {"classifier", "qa_classifier", "answer_head", "cls", "head", "lm_head", "score",
     "vqa_classifier", "itm_score", "mlm_score", "itm_head", "obj_predict_head",
     "rank_output", "snli_classifier", "nlvr2_classifier"}
)  # fmt: skip
"""Names of children that, beside a recognised model, are taken for its task head."""

L, V, X = Modality.LANGUAGE, Modality.VISION, Modality.CROSS

_WITH_ATTENTIONS = (Stream(0), None)
"""Layers returning ``(hidden_states,) + (attention_probs,)`` when asked (LXMERT, ViLT,
VisualBERT): their callers read item 0, and item 1 only with ``output_attentions``; declared
so that a bypass serves both (a learned template holds for the flags it was learned with)."""


def register_recogniser(*class_names: str) -> Callable[[Recogniser], Recogniser]:
    """Register a function building the anatomy of instances of the named classes.

    Args:
        *class_names: class names (any class in the instance's MRO matches).

    Returns:
        A decorator.

    Example::

        @register_recogniser("MyVLModel")
        def _my_vl_model(model: nn.Module) -> Anatomy:
            ...
    """

    def register(fn: Recogniser) -> Recogniser:
        for name in class_names:
            RECOGNISERS[name] = fn
        return fn

    return register


def _recogniser_for(module: nn.Module) -> Recogniser | None:
    for cls in type(module).__mro__:
        fn = RECOGNISERS.get(cls.__name__)
        if fn is not None:
            return fn
    return None


# ---------------------------------------------------------------------- building blocks
def _j(*parts: str) -> str:
    return ".".join(p for p in parts if p)


class _Build:
    """Helper that writes one model's anatomy (paths relative to ``model``)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.an = Anatomy()
        self.modules = dict(model.named_modules())

    def has(self, path: str) -> bool:
        return path in self.modules

    def attention(
        self,
        name: str,
        q: str,
        k: str,
        v: str,
        out: str,
        modality: Modality,
        kind: str = "self",
        query_side: Modality | None = None,
        key_side: Modality | None = None,
        bidirectional: bool = False,
        heads_from: str | None = None,
        layout: str = "separate",
    ) -> str:
        heads = num_heads_of(self.model, self.modules[heads_from or name])
        head_dim = _head_dim(layout, heads, self.modules[out], self.modules[v])
        self.an.attentions.append(
            AttentionSpec(name, heads, head_dim, q, k, v, out, modality, kind, query_side,
                          key_side, bidirectional, layout)
        )  # fmt: skip
        return name

    def bert_attention(self, path: str, modality: Modality, inner: str = "self", **kw: Any) -> str:
        """A BERT-style block: ``<path>.<inner>.{query,key,value}`` + ``<path>.output.dense``."""
        s = _j(path, inner)
        return self.attention(
            path, f"{s}.query", f"{s}.key", f"{s}.value", f"{path}.output.dense", modality,
            heads_from=s, **kw,
        )  # fmt: skip

    def ffn(
        self, name: str, up: str, down: str, modality: Modality, side: Modality | None = None
    ) -> str:
        self.an.ffns.append(FFNSpec(name, up, down, self.modules[up].out_features, modality, side))
        return name

    def bert_layer(
        self,
        path: str,
        stack: str,
        index: int,
        modality: Modality,
        attn: str = "self",
        output: Any = None,
    ) -> None:
        """A BERT-style layer (``attention``, optional ``crossattention``, ``intermediate`` +
        ``output`` FFN) whose queries and keys are all of ``modality``."""
        attns = [self.bert_attention(f"{path}.attention", modality, attn)]
        if self.has(f"{path}.crossattention"):
            attns.append(
                self.bert_attention(f"{path}.crossattention", modality, attn, kind="cross")
            )
        ffn = self.ffn(
            f"{path}.ffn", f"{path}.intermediate.dense", f"{path}.output.dense", modality
        )
        self.an.add_layer(
            LayerSpec(path, stack, index, modality, tuple(attns), (ffn,), output=output)
        )

    def stack(self, path: str) -> list[tuple[str, int]]:
        """``[(layer path, index)]`` of the ``nn.ModuleList`` / ``nn.Sequential`` at ``path``."""
        holder = self.modules.get(path)
        if holder is None:
            raise ValueError(f"{type(self.model).__name__} has no module {path!r}")
        return [(_j(path, str(i)), i) for i in range(len(holder))]

    def extras(self, modality: Modality, *paths: str, prunable: bool = True) -> None:
        """Declare ``paths`` (those that exist) as extra modules of ``modality``, and their
        weight matrices (not position / type embeddings) as prunable extra weights."""
        params = dict(self.model.named_parameters())
        for path in paths:
            if path in self.modules:
                self.an.extra_modules.setdefault(modality, []).append(path)
                if prunable:
                    names = prunable_weights_in(self.modules[path], path)
                    self.an.extra_weights.setdefault(modality, []).extend(names)
            elif path in params:
                self.an.extra_modules.setdefault(modality, []).append(path)


# ---------------------------------------------------------------------- recognisers
@register_recogniser("BertModel", "RobertaModel", "BridgeTowerTextModel", "XLMRobertaModel",
                     "CamembertModel", "ElectraModel")  # fmt: skip
def _bert(model: nn.Module) -> Anatomy:
    """BERT-style text encoders: ``encoder.layer.N`` (language), embeddings, pooler."""
    b = _Build(model)
    for path, i in b.stack("encoder.layer"):
        b.bert_layer(path, "encoder.layer", i, L)
    b.extras(L, "embeddings", "pooler")
    b.an.readouts["embeddings"] = "embeddings"
    return b.an


@register_recogniser("LxmertModel")
def _lxmert(model: nn.Module) -> Anatomy:
    """LXMERT: language ``encoder.layer``, vision ``encoder.r_layers``, cross ``encoder.x_layers``
    (shared bidirectional cross-attention ``visual_attention``; per-stream self-attention and
    FFN)."""
    b = _Build(model)
    for stack, modality in (("encoder.layer", L), ("encoder.r_layers", V)):
        for path, i in b.stack(stack):
            b.bert_layer(path, stack, i, modality, output=_WITH_ATTENTIONS)
    for path, i in b.stack("encoder.x_layers"):
        cross = b.bert_attention(
            f"{path}.visual_attention", X, "att", kind="cross", query_side=L, key_side=V,
            bidirectional=True,
        )  # fmt: skip
        lang = b.bert_attention(f"{path}.lang_self_att", X, query_side=L)
        visn = b.bert_attention(f"{path}.visn_self_att", X, query_side=V)
        ffns = (
            b.ffn(
                f"{path}.lang_ffn", f"{path}.lang_inter.dense", f"{path}.lang_output.dense", X, L
            ),
            b.ffn(
                f"{path}.visn_ffn", f"{path}.visn_inter.dense", f"{path}.visn_output.dense", X, V
            ),
        )
        b.an.add_layer(
            LayerSpec(path, "encoder.x_layers", i, X, (cross, lang, visn), ffns,
                      streams=("lang_feats", "visual_feats"), stream_sides=(L, V),
                      output=(Stream(0), Stream(1), None))
        )  # fmt: skip
    b.extras(L, "embeddings")
    b.extras(V, "encoder.visn_fc")
    b.extras(X, "pooler")
    b.an.readouts.update({"language_input": "embeddings", "vision_input": "encoder.visn_fc"})
    return b.an


@register_recogniser("VisualBertModel")
def _visual_bert(model: nn.Module) -> Anatomy:
    """VisualBERT: one BERT stream over text and image tokens (cross)."""
    b = _Build(model)
    for path, i in b.stack("encoder.layer"):
        b.bert_layer(path, "encoder.layer", i, X, output=_WITH_ATTENTIONS)
    b.extras(X, "embeddings", prunable=False)
    b.extras(L, *(f"embeddings.{n}" for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")))  # fmt: skip
    b.extras(V, *(f"embeddings.{n}" for n in ("visual_projection", "visual_token_type_embeddings", "visual_position_embeddings")))  # fmt: skip
    b.extras(X, "pooler")
    b.an.readouts["embeddings"] = "embeddings"
    return b.an


@register_recogniser("ViltModel")
def _vilt(model: nn.Module) -> Anatomy:
    """ViLT: one ViT stream over text and image patches (cross)."""
    b = _Build(model)
    for path, i in b.stack("encoder.layer"):
        b.bert_layer(path, "encoder.layer", i, X, attn="attention", output=_WITH_ATTENTIONS)
    b.extras(X, "embeddings", prunable=False)
    b.extras(L, "embeddings.text_embeddings")
    b.extras(
        V, "embeddings.patch_embeddings", "embeddings.cls_token", "embeddings.position_embeddings"
    )
    b.extras(X, "layernorm", "pooler")
    b.an.readouts["embeddings"] = "embeddings"
    return b.an


def _clip_encoder(b: _Build, modality: Modality) -> None:
    for path, i in b.stack("encoder.layers"):
        a = f"{path}.self_attn"
        attn = b.attention(
            a, f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj", f"{a}.out_proj", modality
        )
        ffn = b.ffn(f"{path}.mlp", f"{path}.mlp.fc1", f"{path}.mlp.fc2", modality)
        b.an.add_layer(LayerSpec(path, "encoder.layers", i, modality, (attn,), (ffn,)))


@register_recogniser("CLIPVisionModel", "CLIPVisionTransformer")
def _clip_vision(model: nn.Module) -> Anatomy:
    """CLIP's image tower: ``encoder.layers.N`` (vision), embeddings and norms."""
    b = _Build(model)
    _clip_encoder(b, V)
    b.extras(V, "embeddings", "pre_layrnorm", "post_layernorm")
    b.an.readouts["embeddings"] = "pre_layrnorm"
    return b.an


@register_recogniser("CLIPTextModel", "CLIPTextTransformer")
def _clip_text(model: nn.Module) -> Anatomy:
    """CLIP's text tower: ``encoder.layers.N`` (language), embeddings, final norm."""
    b = _Build(model)
    _clip_encoder(b, L)
    b.extras(L, "embeddings", "final_layer_norm")
    b.an.readouts["embeddings"] = "embeddings"
    return b.an


def _tower(
    model: nn.Module, build: Recogniser, path: str, modality: Modality, projection: str
) -> Anatomy:
    """The anatomy of the tower at ``path`` (built by ``build``) and its ``projection``."""
    b = _Build(model)
    b.an = build(model.get_submodule(path)).prefixed(path)
    b.extras(modality, projection)
    return b.an


@register_recogniser("CLIPModel")
def _clip(model: nn.Module) -> Anatomy:
    """CLIP: both towers, their projections, the logit scale."""
    b = _Build(model)
    b.an = _tower(model, _clip_text, "text_model", L, "text_projection")
    b.an.merge(_tower(model, _clip_vision, "vision_model", V, "visual_projection"))
    b.extras(X, "logit_scale")
    return b.an


@register_recogniser("CLIPVisionModelWithProjection")
def _clip_vision_projected(model: nn.Module) -> Anatomy:
    """CLIP's image tower and its projection."""
    return _tower(model, _clip_vision, "vision_model", V, "visual_projection")


@register_recogniser("CLIPTextModelWithProjection")
def _clip_text_projected(model: nn.Module) -> Anatomy:
    """CLIP's text tower and its projection."""
    return _tower(model, _clip_text, "text_model", L, "text_projection")


def _bridgetower_vision(b: _Build, root: str) -> None:
    stack = _j(root, "visual.transformer.resblocks")
    for path, i in b.stack(stack):
        a = f"{path}.attn"
        attn = b.attention(a, a, a, a, f"{a}.out_proj", V, layout="packed")
        ffn = b.ffn(f"{path}.mlp", f"{path}.mlp.c_fc", f"{path}.mlp.c_proj", V)
        b.an.add_layer(LayerSpec(path, stack, i, V, (attn,), (ffn,)))
    b.extras(V, _j(root, "visual.embeddings"), _j(root, "visual.ln_pre"),
             _j(root, "visual.ln_post"), _j(root, "visual.ln_separate"),
             _j(root, "visual.cross_modal_ln_separate"))  # fmt: skip


@register_recogniser("BridgeTowerVisionModel")
def _bridgetower_vision_model(model: nn.Module) -> Anatomy:
    """BridgeTower's (CLIP) vision model: ``visual.transformer.resblocks.N`` with
    ``nn.MultiheadAttention`` (packed)."""
    b = _Build(model)
    _bridgetower_vision(b, "")
    return b.an


@register_recogniser("BridgeTowerModel")
def _bridgetower(model: nn.Module) -> Anatomy:
    """BridgeTower: text tower (language), vision tower (vision, packed attention), and the
    cross-modal text and image layers (self-attention on one stream, cross-attention to the
    other), bridges and poolers (cross)."""
    b = _Build(model)
    b.an = _bert(model.text_model).prefixed("text_model")
    _bridgetower_vision(b, "vision_model")
    for stack, side, other in (
        ("cross_modal_text_layers", L, V),
        ("cross_modal_image_layers", V, L),
    ):
        for path, i in b.stack(stack):
            self_attn = b.bert_attention(f"{path}.attention", X, query_side=side)
            cross = b.bert_attention(
                f"{path}.crossattention", X, kind="cross", query_side=side, key_side=other
            )
            ffn = b.ffn(
                f"{path}.ffn", f"{path}.intermediate.dense", f"{path}.output.dense", X, side
            )
            b.an.add_layer(
                LayerSpec(path, stack, i, X, (self_attn, cross), (ffn,), stream_sides=(side,))
            )
    tops = [n for n, _ in model.named_children() if n not in
            ("text_model", "vision_model", "cross_modal_text_layers", "cross_modal_image_layers")]  # fmt: skip
    b.extras(X, *tops)
    return b.an


@register_recogniser("VisionTransformer")
def _timm_vit(model: nn.Module) -> Anatomy:
    """timm ``VisionTransformer``: ``blocks.N`` (vision), fused ``attn.qkv`` (or separate
    ``q_proj``/``k_proj``/``v_proj``), ``mlp.fc1``/``mlp.fc2``; ``head`` is the task head."""
    b = _Build(model)
    for path, i in b.stack("blocks"):
        a = f"{path}.attn"
        if isinstance(b.modules.get(f"{a}.qkv"), nn.Linear):
            attn = b.attention(
                a, f"{a}.qkv", f"{a}.qkv", f"{a}.qkv", f"{a}.proj", V, layout="fused"
            )
        else:
            attn = b.attention(a, f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj", f"{a}.proj", V)
        ffn = b.ffn(f"{path}.mlp", f"{path}.mlp.fc1", f"{path}.mlp.fc2", V)
        b.an.add_layer(LayerSpec(path, "blocks", i, V, (attn,), (ffn,)))
    b.extras(V, "patch_embed", "cls_token", "reg_token", "pos_embed", "norm_pre", "norm",
             "fc_norm", "attn_pool")  # fmt: skip
    if isinstance(b.modules.get("head"), nn.Linear):
        b.an.head_modules.append("head")
    b.an.readouts["embeddings"] = "norm_pre" if b.has("norm_pre") else "patch_embed"
    return b.an


# ---------------------------------------------------------------------- discovery
def _own_declaration(module: nn.Module) -> Anatomy | None:
    declare = getattr(module, "anatomy", None)
    if callable(declare) and not isinstance(module, Anatomy):
        an = declare()
        if not isinstance(an, Anatomy):
            raise TypeError(
                f"{type(module).__name__}.anatomy() returned {type(an).__name__}, not "
                "vlcompress.models.anatomy.Anatomy."
            )
        return an
    return None


def recognise(model: nn.Module) -> Anatomy | None:
    """The anatomy of every declared or recognised model inside ``model``, merged.

    Walks the modules from the top; a module that declares ``anatomy()`` or whose class is
    recognised is claimed with everything under it. Children named like a task head
    (:data:`TASK_HEAD_NAMES`) beside a claimed model become :attr:`Anatomy.head_modules`.

    Args:
        model: any module.

    Returns:
        The merged anatomy (paths from ``model``), or ``None`` if nothing is recognised.
    """
    found: Anatomy | None = None
    claimed: list[str] = []
    for path, module in model.named_modules():
        if any(path == c or path.startswith(f"{c}.") for c in claimed):
            continue
        an = _own_declaration(module)
        if an is None:
            fn = _recogniser_for(module)
            if fn is None:
                continue
            try:
                an = fn(module)
            except (KeyError, AttributeError, ValueError, IndexError, TypeError) as err:
                message = (
                    f"{type(module).__name__} at {path or 'the top level'!r} has the name of a "
                    f"recognised class but not its modules ({type(err).__name__}: {err}); it is "
                    "skipped. Declare its anatomy with AnatomyPatterns or an anatomy() method."
                )
                warnings.warn(message, stacklevel=3)
                continue
        log.debug("recognised %s at %r", type(module).__name__, path)
        an = an.prefixed(path)
        found = an if found is None else found.merge(an)
        claimed.append(path)
        if not path:
            break
    if found is None:
        return None
    declared = set(found.head_modules)
    for c in claimed:
        parent = c.rpartition(".")[0] if c else None
        while parent is not None:
            holder = model.get_submodule(parent)
            for name, _ in holder.named_children():
                full = _j(parent, name)
                if name in TASK_HEAD_NAMES and full not in declared and full not in claimed:
                    found.head_modules.append(full)
                    declared.add(full)
            parent = parent.rpartition(".")[0] if parent else None
    return found


def _is_bert_like(model: nn.Module) -> bool:
    names = [n for n, _ in model.named_modules()]
    rx = re.compile(BERT_PATTERNS.layer)
    return any(rx.match(n) for n in names) and any(
        n.endswith("attention.self.query") for n in names
    )


def anatomy_of(
    model: nn.Module,
    patterns: AnatomyPatterns | None = None,
    *,
    min_coverage: float = 0.9,
    strict: bool = False,
) -> Anatomy:
    """The anatomy of ``model``.

    In order: one built from ``patterns``; the model's own ``anatomy()``; recognised models
    inside it (:func:`recognise`); BERT-style module names. The result is validated, and its
    coverage measured: when the declared parts hold less than ``min_coverage`` of the
    parameters, a ``UserWarning`` (``warnings.warn`` only, not also logged) names the largest
    undeclared modules, or, with ``strict``, a ``ValueError`` is raised.

    Args:
        model: the model (or a module holding it, e.g. a LightningModule).
        patterns: module-name patterns to use instead of recognition.
        min_coverage: the share of parameters (0 to 1) the anatomy must declare.
        strict: raise instead of warning when coverage is below ``min_coverage``.

    Returns:
        The anatomy (paths relative to ``model``).

    Raises:
        TypeError: when the model declares nothing, no patterns are given, and it is not
            recognised.
        ValueError: when the anatomy does not match the model, for a ``min_coverage`` outside
            [0, 1], or (``strict``) for a coverage below ``min_coverage``.

    Example::

        anatomy = anatomy_of(ViltForQuestionAnswering(config), min_coverage=0.95)
        anatomy.coverage(model).fraction
    """
    if not 0.0 <= min_coverage <= 1.0:
        raise ValueError(f"min_coverage must be within [0, 1], got {min_coverage}.")
    if patterns is not None:
        anatomy = anatomy_from_patterns(model, patterns)
    else:
        anatomy = _own_declaration(model) or recognise(model)
        if anatomy is None and _is_bert_like(model):
            anatomy = anatomy_from_patterns(model, BERT_PATTERNS)
        if anatomy is None:
            raise TypeError(
                f"{type(model).__name__} declares no anatomy and is not recognised: give it an "
                "`anatomy()` method returning vlcompress.models.anatomy.Anatomy, or pass "
                "AnatomyPatterns describing its layer names (see BERT_PATTERNS). Recognised "
                f"classes: {sorted(RECOGNISERS)}."
            )
    anatomy.validate(model)
    report = anatomy.coverage(model)
    if report.fraction < min_coverage:
        message = (
            f"the anatomy of {type(model).__name__} declares {report.fraction:.1%} of its "
            f"parameters (min_coverage={min_coverage:.0%}); not declared: "
            f"{report.largest_uncovered()}. Compression will not touch those parts: declare "
            "them (extra_modules / extra_weights / head_modules) or lower min_coverage."
        )
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    return anatomy
