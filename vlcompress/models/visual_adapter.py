"""Pixels to region-like inputs, so that region-based models (LXMERT, MCAN with regions, UNITER)
see raw-image benchmarks such as easy-VQA the way they see VQA v2's detector features.

VQA v2 region models read ``N`` feature vectors ``(B, N, D)`` and their normalised boxes
``(B, N, 4)`` (``x1, y1, x2, y2`` in [0, 1]). :class:`GridRegionAdapter` turns an image into the
same pair: MCAN's conv stem (:class:`~vlcompress.models.mcan.GridStem`) makes one feature per
cell of its final grid, and each cell's box is its square of the image. The cells tile the
image exactly (row-major, the order of the stem's tokens).

A region model that takes both inputs declares the adapter's options by deriving its options
dataclass from :class:`PixelInputOptions`, builds the adapter with
:meth:`PixelInputOptions.build_adapter` and reads a batch with :func:`region_inputs`.

Example::

    adapter = GridRegionAdapter(feature_dim=2048, channels=(8, 16, 32, 64), image_size=64)
    feats, boxes = adapter(pixels)      # (B, 16, 2048), (B, 16, 4)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from vlcompress.data.batch import VLBatch
from vlcompress.models.mcan import GridStem
from vlcompress.options import in_range, positive

__all__ = ["GridRegionAdapter", "PixelInputOptions", "grid_boxes", "grid_side", "region_inputs"]


def grid_side(size: int, stages: int, pool: bool = True) -> int:
    """Side of the grid that ``stages`` halvings of the stem leave of an image side ``size``.

    Args:
        size: image height or width in pixels.
        stages: number of conv stages (each halves the side).
        pool: max-pooling (floor) rather than stride-2 convolutions (ceil).

    Returns:
        The number of cells along that side.

    Raises:
        ValueError: when the image is too small for the stages.
    """
    side = size
    for _ in range(stages):
        side = side // 2 if pool else (side - 1) // 2 + 1
    if side < 1:
        raise ValueError(
            f"an image side of {size} pixels leaves no cell after {stages} halving stages; use "
            "fewer adapter channels (stages) or larger images."
        )
    return side


def grid_boxes(rows: int, cols: int) -> torch.Tensor:
    """Normalised boxes ``(rows * cols, 4)`` (``x1, y1, x2, y2``) of a grid's cells, row-major.

    Args:
        rows, cols: grid size.

    Returns:
        Boxes whose union is the unit square and which do not overlap.
    """
    ys = torch.arange(rows, dtype=torch.float32)
    xs = torch.arange(cols, dtype=torch.float32)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x / cols, y / rows, (x + 1) / cols, (y + 1) / rows], dim=-1).reshape(-1, 4)


class GridRegionAdapter(nn.Module):
    """Images ``(B, 3, H, W)`` in [0, 1] -> region-like features ``(B, N, feature_dim)`` and
    boxes ``(B, N, 4)``, one region per cell of the conv stem's final grid.

    Args:
        feature_dim: size of each region feature (2048 to stand in for detector features).
        channels: channels of the stem's conv stages; each stage halves the image side.
        context_layers: stride-1 convs at the grid resolution (wider view per cell).
        pool: halve by max-pooling (else stride-2 convs).
        image_size: side of the (square) images the adapter is built for.

    Raises:
        ValueError: for an image size the stages cannot divide, or (at call time) images of
            another size.

    Example::

        feats, boxes = GridRegionAdapter(256, (8, 16, 32, 64), image_size=64)(pixels)
    """

    def __init__(
        self,
        feature_dim: int,
        channels: tuple[int, ...] = (32, 64, 128, 256),
        context_layers: int = 2,
        pool: bool = True,
        image_size: int = 64,
    ) -> None:
        super().__init__()
        if feature_dim < 1 or image_size < 1 or not channels or min(channels) < 1:
            raise ValueError(
                f"GridRegionAdapter needs a positive feature_dim, image_size and channels; got "
                f"feature_dim={feature_dim}, image_size={image_size}, channels={list(channels)}."
            )
        self.image_size, self.pool, self.stages = image_size, pool, len(channels)
        side = grid_side(image_size, len(channels), pool)
        self.stem = GridStem(tuple(channels), feature_dim, context_layers, pool, side * side)
        self.register_buffer("boxes", grid_boxes(side, side), persistent=False)

    @property
    def num_regions(self) -> int:
        """Regions per image (cells of the grid)."""
        return int(self.boxes.shape[0])

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Region features ``(B, N, feature_dim)`` and boxes ``(B, N, 4)`` of ``pixels``."""
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(
                f"GridRegionAdapter expects pixels (B, 3, H, W); got shape {tuple(pixels.shape)}."
            )
        h, w = pixels.shape[-2:]
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(
                f"GridRegionAdapter was built for {self.image_size}x{self.image_size} images, got "
                f"{h}x{w}; set the model's image_size option to {h} (square images)."
            )
        feats = self.stem(pixels)
        return feats, self.boxes.to(feats.dtype).expand(feats.shape[0], -1, -1)


@dataclass(frozen=True)
class PixelInputOptions:
    """The options of a region model that can also read pixels through a grid adapter; a
    model's options dataclass derives from it (and calls :meth:`check_adapter` in its
    ``__post_init__``).

    Attributes:
        visual_input: ``regions`` (features + boxes in the batch) or ``pixels`` (images through
            the grid adapter; region batches are then still accepted).
        adapter_channels, adapter_context_layers, image_size: the grid adapter of ``pixels``
            (each channel entry is a conv stage halving the image side).
    """

    visual_input: Literal["regions", "pixels"] = "regions"
    adapter_channels: tuple[int, ...] = (32, 64, 128, 256)
    adapter_context_layers: int = field(default=2, metadata=in_range(0))
    image_size: int = positive(64)

    def check_adapter(self, model: str) -> None:
        """Check the adapter's options.

        Args:
            model: the model's name, for the message.

        Raises:
            ValueError: for empty or non-positive ``adapter_channels``.
        """
        if not self.adapter_channels or min(self.adapter_channels) < 1:
            raise ValueError(
                f"{model} adapter_channels must be a non-empty list of positive sizes, got "
                f"{list(self.adapter_channels)}."
            )

    def build_adapter(self, feature_dim: int) -> GridRegionAdapter | None:
        """The grid adapter making ``feature_dim``-d regions (``None`` for ``regions``)."""
        if self.visual_input != "pixels":
            return None
        return GridRegionAdapter(
            feature_dim, tuple(self.adapter_channels), self.adapter_context_layers,
            image_size=self.image_size,
        )  # fmt: skip


def region_inputs(
    batch: VLBatch,
    adapter: GridRegionAdapter | None,
    feature_dim: int,
    model: str,
    dim_option: str,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Region features ``(B, N, feature_dim)``, boxes ``(B, N, 4)`` (``None`` when a region
    batch has none) and region mask of ``batch``; pixels go through ``adapter``.

    Args:
        batch: region features + boxes, or pixels.
        adapter: the model's grid adapter (``None``: the model reads regions only).
        feature_dim: the region feature size the model was built for.
        model, dim_option: the model's name and the option setting ``feature_dim``, for
            messages.

    Raises:
        ValueError: for pixels without an adapter, or region features of another size.

    Example::

        feats, boxes, mask = region_inputs(batch, self.adapter, 2048, "UNITER", "region_dim")
    """
    if batch.is_pixels:
        if adapter is None:
            raise ValueError(
                f"this {model} expects region features (B, N, D) + boxes, got pixels; build it "
                "with visual_input: pixels to add the grid adapter."
            )
        feats, boxes = adapter(batch.visual)
        return feats, boxes, None
    if batch.visual.shape[-1] != feature_dim:
        raise ValueError(
            f"{model} was built for {feature_dim}-d region features, the batch has "
            f"{batch.visual.shape[-1]}-d; set {dim_option} accordingly."
        )
    return batch.visual, batch.boxes, batch.visual_mask
