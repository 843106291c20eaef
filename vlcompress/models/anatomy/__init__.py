"""The anatomy: how a model declares its structure so that every callback can work on it.

A callback never imports a concrete model. It asks :func:`anatomy_of` for the model's
:class:`Anatomy` and acts through it:

* pruning — :meth:`Anatomy.prunable_weights` (weights per modality), :meth:`Anatomy.mask_heads`
  (whole attention heads, for separate, fused and packed projections),
  :meth:`Anatomy.mask_ffn_units` (feed-forward neurons);
* slimming — heads and FFN units by the same masks (width), :attr:`Anatomy.stacks` (ordered
  layers) with :meth:`Anatomy.replace_layer` (depth);
* skipping — :meth:`Anatomy.bypass_layer`: a :class:`LayerBypass` returning exactly what the
  layer's caller expects (one or two streams, tensor or tuple), optionally through adapters;
* distillation — :meth:`Anatomy.capture` reads hidden states at the declared read-out points;
* trust — :meth:`Anatomy.coverage` says how much of the model the anatomy declares.

Models we wrote declare their anatomy (``model.anatomy()``); for other models it is built
from module-name patterns (:func:`anatomy_from_patterns`), and the Hugging Face and timm models
of our roadmap are recognised automatically (:mod:`~vlcompress.models.anatomy.recognise`).
Importing this package imports neither transformers, timm nor any of our models.

Example::

    from vlcompress.models.anatomy import anatomy_of

    anatomy = anatomy_of(model)            # warns if it declares < 90% of the parameters
    anatomy.prunable_weights(model)        # {Modality.LANGUAGE: {...}, Modality.VISION: ...}
    handles = anatomy.mask_heads(model, {anatomy.attentions[0].name: mask})
    original = anatomy.bypass_layer(model, anatomy.stacks["encoder.layer"][-1])
"""

from vlcompress.models.anatomy.bypass import LayerBypass, SkipForward, build_output, output_template
from vlcompress.models.anatomy.core import Anatomy, prunable_weights_in
from vlcompress.models.anatomy.coverage import CoverageReport
from vlcompress.models.anatomy.masks import MaskHandle
from vlcompress.models.anatomy.patterns import (
    BERT_PATTERNS,
    AnatomyPatterns,
    anatomy_from_patterns,
    num_heads_of,
)
from vlcompress.models.anatomy.recognise import (
    RECOGNISERS,
    TASK_HEAD_NAMES,
    anatomy_of,
    recognise,
    register_recogniser,
)
from vlcompress.models.anatomy.specs import (
    ATTENTION_KINDS,
    ATTENTION_LAYOUTS,
    AttentionSpec,
    FFNSpec,
    LayerSpec,
    Modality,
    OutputTemplate,
    SlimSpec,
    Stream,
    default_depth_priority,
)

__all__ = [
    "ATTENTION_KINDS",
    "ATTENTION_LAYOUTS",
    "BERT_PATTERNS",
    "RECOGNISERS",
    "TASK_HEAD_NAMES",
    "Anatomy",
    "AnatomyPatterns",
    "AttentionSpec",
    "CoverageReport",
    "FFNSpec",
    "LayerBypass",
    "LayerSpec",
    "MaskHandle",
    "Modality",
    "OutputTemplate",
    "SkipForward",
    "SlimSpec",
    "Stream",
    "anatomy_from_patterns",
    "anatomy_of",
    "build_output",
    "default_depth_priority",
    "num_heads_of",
    "output_template",
    "prunable_weights_in",
    "recognise",
    "register_recogniser",
]
