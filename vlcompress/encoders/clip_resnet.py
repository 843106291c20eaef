"""The CLIP ResNet image encoder: OpenAI's ``ModifiedResNet`` trunk built by timm, its input
normalisation and the loader of OpenAI's checkpoints.

* :func:`build_clip_resnet`: the trunk without its attention pool, ``(B, 3, H, W)`` -> grid
  features ``(B, C, H/32, W/32)`` (:data:`CLIP_RESNETS`: RN50, RN101, RN50x4, RN50x16, RN50x64
  and a ``tiny`` one for tests);
* :func:`clip_input`: pixels in [0, 1] resized and normalised with CLIP's mean and std
  (:data:`CLIP_MEAN`, :data:`CLIP_STD`);
* :func:`load_openai_clip_visual`: the image tower of a local OpenAI file (``RN50.pt``, ...)
  into the trunk, through timm's own OpenAI-to-timm key conversion.

CLIP-ViL (:mod:`vlcompress.models.clip_vil`) runs the trunk on pixels; ``prepare clip-grid``
(:mod:`vlcompress.data.clip_grid`) runs the same trunk once over COCO to store grid features.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlcompress.encoders._checkpoint import tensor_state

__all__ = [
    "CLIP_MEAN",
    "CLIP_RESNETS",
    "CLIP_STD",
    "build_clip_resnet",
    "clip_input",
    "load_openai_clip_visual",
]

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""CLIP's per-channel pixel mean (RGB, pixels in [0, 1])."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""CLIP's per-channel pixel standard deviation."""

CLIP_RESNETS: dict[str, tuple[tuple[int, ...], int]] = {
    "resnet50_clip": ((3, 4, 6, 3), 64),
    "resnet101_clip": ((3, 4, 23, 3), 64),
    "resnet50x4_clip": ((4, 6, 10, 6), 80),
    "resnet50x16_clip": ((6, 8, 18, 8), 96),
    "resnet50x64_clip": ((3, 15, 36, 10), 128),
    "tiny": ((1, 1, 1, 1), 8),
}
"""The visual encoders: timm's name (OpenAI's RN50, RN101, RN50x4, RN50x16, RN50x64) or
``tiny`` -> (blocks per stage, stem width) of OpenAI's ``ModifiedResNet``; the grid features
have ``32 * width`` channels."""

_OPENAI_FILES = {
    "resnet50_clip": "RN50.pt",
    "resnet101_clip": "RN101.pt",
    "resnet50x4_clip": "RN50x4.pt",
    "resnet50x16_clip": "RN50x16.pt",
    "resnet50x64_clip": "RN50x64.pt",
}


# ---------------------------------------------------------------------- the CLIP ResNet
def build_clip_resnet(name: str) -> nn.Module:
    """A CLIP ResNet trunk from timm, without its attention pool: ``(B, 3, H, W)`` ->
    grid features ``(B, C, H/32, W/32)`` (random weights; nothing is downloaded).

    Args:
        name: a key of :data:`CLIP_RESNETS` (``tiny``: the same design, width 8, one block per
            stage).

    Returns:
        A timm ``ByobNet`` whose ``num_features`` is ``C``.

    Example::

        trunk = build_clip_resnet("resnet50_clip")
        trunk(torch.rand(1, 3, 224, 224)).shape      # (1, 2048, 7, 7)
    """
    import timm
    from timm.models.byobnet import ByoBlockCfg, ByobNet, model_cfgs

    # the "_gap" sibling is the same trunk with a pooling head; with no classes and no pooling
    # the head is an identity and the model returns the grid
    kwargs = dict(num_classes=0, global_pool="", zero_init_last=False)
    if name != "tiny":
        return timm.create_model(f"{name}_gap", pretrained=False, **kwargs)
    blocks, width = CLIP_RESNETS["tiny"]
    cfg = dataclasses.replace(
        model_cfgs["resnet50_clip_gap"],
        blocks=tuple(
            ByoBlockCfg(type="bottle", d=d, c=4 * width * 2**i, s=1 if i == 0 else 2, br=0.25)
            for i, d in enumerate(blocks)
        ),
        stem_chs=(width // 2, width // 2, width),
    )
    return ByobNet(cfg, **kwargs)


def clip_input(
    pixels: torch.Tensor,
    image_size: int | None = None,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> torch.Tensor:
    """The CLIP ResNet's input: images ``(B, 3, H, W)`` in [0, 1] resized to ``image_size``
    square (bicubic, antialiased, clamped to [0, 1]; ``None`` or already that size: as given),
    then normalised with CLIP's mean and std (:data:`CLIP_MEAN`, :data:`CLIP_STD`, or ``mean`` /
    ``std`` tensors ``(3, 1, 1)``).

    Example::

        grid = trunk(clip_input(pixels, 448))      # (B, C, 14, 14)
    """
    if image_size is not None and tuple(pixels.shape[-2:]) != (image_size, image_size):
        pixels = F.interpolate(
            pixels, size=(image_size, image_size), mode="bicubic", align_corners=False,
            antialias=True,
        ).clamp_(0.0, 1.0)  # fmt: skip
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1) if mean is None else mean
    std = torch.tensor(CLIP_STD).view(3, 1, 1) if std is None else std
    return (pixels - mean.to(pixels.device, pixels.dtype)) / std.to(pixels.device, pixels.dtype)


# ---------------------------------------------------------------------- OpenAI checkpoints
def _read_openai_checkpoint(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of an OpenAI CLIP file: a TorchScript archive (as published) or a state
    dict (``torch.save``'d, optionally under ``state_dict`` and with a ``module.`` prefix)."""
    if not file.is_file():
        where = "is a folder" if file.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"CLIP checkpoint {str(file)!r} {where}; expected OpenAI's file for the encoder "
            "(RN50.pt, RN50x4.pt, ...: the TorchScript archive that openai/CLIP's clip.load "
            "downloads, or a state dict with visual.* keys). Fetch it on a machine with "
            "internet and set model.options.visual_checkpoint to the file."
        )
    scripted = False
    if zipfile.is_zipfile(file):
        with zipfile.ZipFile(file) as z:
            scripted = any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    if scripted:  # OpenAI's own format; TorchScript is deprecated, but this is how it is read
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*jit")
            raw: Any = torch.jit.load(str(file), map_location="cpu").state_dict()
    else:
        raw = torch.load(file, map_location="cpu", weights_only=True)
    return tensor_state(
        raw, file, "a CLIP checkpoint",
        "a TorchScript archive or a dict of tensors with keys visual.*",
    )  # fmt: skip


def _openai_resnet_shape(state: Mapping[str, torch.Tensor]) -> tuple[tuple[int, ...], int]:
    """(blocks per stage, stem width) of the ``ModifiedResNet`` in an OpenAI state dict."""
    blocks = tuple(
        len({k.split(".")[2] for k in state if k.startswith(f"visual.layer{i}.")})
        for i in range(1, 5)
    )
    return blocks, int(state["visual.conv1.weight"].shape[0]) * 2


def _which_encoder(shape: tuple[tuple[int, ...], int]) -> str:
    for name, known in CLIP_RESNETS.items():
        if known == shape:
            return name
    return f"none registered (blocks {list(shape[0])}, width {shape[1]})"


def load_openai_clip_visual(visual: nn.Module, path: str | Path, encoder: str = "") -> list[str]:
    """Load the image encoder of an OpenAI CLIP ResNet checkpoint into a timm CLIP ResNet.

    The file is OpenAI's (``RN50.pt``, ``RN50x4.pt``, ...: a TorchScript archive whose state
    dict holds ``visual.conv1.weight``, ``visual.layer1.0.conv1.weight``, ...,
    ``visual.attnpool.*`` and the text tower), or a state dict of the same keys. The
    ``visual.*`` tensors are renamed by timm's own conversion
    (``timm.models.byobnet.checkpoint_filter_fn``); the attention pool is dropped (the trunk
    has none), the text tower ignored, half-precision tensors cast to the model's dtype.

    Args:
        visual: a CLIP ResNet trunk from :func:`build_clip_resnet`.
        path: the checkpoint file.
        encoder: the trunk's name in :data:`CLIP_RESNETS`, for messages.

    Returns:
        The keys of the file that were not loaded (the attention pool and the text tower).

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: for a file that is not an OpenAI CLIP ResNet checkpoint (a ViT one
            included), one of another encoder (the message names the option to set), or
            missing / unexpected / differently-shaped tensors.

    Example::

        load_openai_clip_visual(model.visual, "/data/clip/RN50.pt", "resnet50_clip")
    """
    from timm.models.byobnet import checkpoint_filter_fn

    file = Path(path).expanduser()
    raw = _read_openai_checkpoint(file)
    where = f"CLIP checkpoint {str(file)!r}"
    if "visual.conv1.weight" not in raw:
        sample = list(raw)[:5]
        raise ValueError(
            f"{where} is not an OpenAI CLIP checkpoint: expected keys visual.conv1.weight, "
            f"visual.layer1.0.conv1.weight, ...; found {sample}."
        )
    if any(k.startswith("visual.transformer.") for k in raw):
        raise ValueError(
            f"{where} holds a CLIP ViT image encoder; this loader reads the ResNet ones "
            f"({', '.join(_OPENAI_FILES.values())}); load it with "
            "vlcompress.encoders.load_openai_clip_vit (or build_encoder('clip_vit', path))."
        )
    shape = _openai_resnet_shape(raw)
    ours = visual.state_dict()
    if encoder and CLIP_RESNETS.get(encoder) != shape:
        found = _which_encoder(shape)
        raise ValueError(
            f"{where} is the CLIP ResNet {found}, the model's visual_encoder is {encoder!r}; "
            f"set model.options.visual_encoder: {found}"
            + ("." if found in CLIP_RESNETS else " (or use a checkpoint of the chosen encoder).")
        )
    visual_keys = {k: v for k, v in raw.items() if k.startswith("visual.")}
    state = checkpoint_filter_fn(visual_keys, visual)
    unused = sorted(
        k for k in raw if not k.startswith("visual.") or k.startswith("visual.attnpool.")
    )
    missing = [k for k in ours if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in ours]
    if missing or unexpected:
        raise ValueError(
            f"{where} does not match the CLIP ResNet layout: missing {missing or 'nothing'} "
            f"(timm names); unexpected {unexpected or 'nothing'}."
        )
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(ours[k].shape)}"
        for k, v in state.items()
        if v.shape != ours[k].shape
    ]
    if shapes:
        more = f" (and {len(shapes) - 5} more)" if len(shapes) > 5 else ""
        raise ValueError(f"{where} does not fit this CLIP ResNet: {'; '.join(shapes[:5])}{more}.")
    with torch.no_grad():
        for k, v in state.items():
            ours[k].copy_(v.to(ours[k].dtype) if v.is_floating_point() else v)
    log.info("loaded the CLIP ResNet of %s (%d tensors; %d not used: attention pool, text tower)",
             file, len(state), len(unused))  # fmt: skip
    return unused
