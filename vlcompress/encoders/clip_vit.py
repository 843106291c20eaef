"""The CLIP ViT image encoder: OpenAI's ``VisionTransformer`` under OpenAI's own parameter
names, and the loader of OpenAI's ViT checkpoints (``ViT-B-32.pt``, ``ViT-B-16.pt``,
``ViT-L-14.pt``, ...).

* :class:`CLIPVisionTransformer`: the image tower, parameter for parameter (``conv1``,
  ``class_embedding``, ``positional_embedding``, ``ln_pre``, ``transformer.resblocks.<i>.{ln_1,
  attn, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_post``, ``proj``), so the ``visual.*`` tensors of a
  checkpoint load as they are; CLIP-normalised images in, the patch-token grid and the projected
  image features out (:class:`CLIPViTFeatures`); any input size, through positional embeddings
  interpolated over the patch grid;
* :func:`clip_vit_config`: its sizes read from the shapes of a checkpoint, as OpenAI's
  ``build_model`` does;
* :func:`load_openai_clip_vit`: a local OpenAI file (or its state dict) loaded strictly.

The input normalisation is the ResNet's, :func:`vlcompress.encoders.clip_resnet.clip_input`
(CLIP's mean and std), and the file is read by the same reader (TorchScript archive or state
dict); no weights ship with the project.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vlcompress.encoders.clip_resnet import _read_openai_checkpoint, clip_input
from vlcompress.encoders.text import _Transformer

__all__ = [
    "CLIPVisionTransformer",
    "CLIPViTFeatures",
    "clip_vit_config",
    "load_openai_clip_vit",
]

log = logging.getLogger(__name__)

_PREFIX = "visual."
_VIT_FILES = ("ViT-B-32.pt", "ViT-B-16.pt", "ViT-L-14.pt", "ViT-L-14-336px.pt")


class CLIPViTFeatures(NamedTuple):
    """What :class:`CLIPVisionTransformer` returns for a batch of images."""

    grid: torch.Tensor
    """``(B, width, H/p, W/p)``: the patch tokens of the last residual block after ``ln_post``
    (the class token dropped), not projected, laid back on the patch grid (row ``i``, column
    ``j`` is the patch at that place): CLIP-ViL's grid features of a ViT. OpenAI's own forward
    applies ``ln_post`` to the class token only; ``transformers``' equivalent is
    ``post_layernorm(last_hidden_state[:, 1:])``."""
    pooled: torch.Tensor
    """``(B, embed_dim)``: ``ln_post(class token) @ proj``, OpenAI's ``encode_image`` (before
    the L2 normalisation of CLIP's similarity; ``transformers``' ``image_embeds``)."""


# ---------------------------------------------------------------------- the CLIP ViT
class CLIPVisionTransformer(nn.Module):
    """OpenAI CLIP's ViT image encoder, parameter for parameter (its names are OpenAI's, so
    ``load_state_dict`` takes the ``visual.*`` tensors of an OpenAI checkpoint, prefix removed).

    Patches of ``patch_size`` pixels embedded by ``conv1`` (no bias), a learned class token in
    front, learned positions added, ``ln_pre``, pre-LayerNorm residual attention blocks without
    a mask (QuickGELU MLPs of width ``4 * width``), then ``ln_post``: the class token times
    ``proj`` is the image feature, the patch tokens are the grid (see :class:`CLIPViTFeatures`).

    Inputs of another size than ``image_size`` work: the patch positions (a square grid of
    ``image_size / patch_size`` per side) are interpolated bicubically (``align_corners=False``,
    as ``transformers``' ``interpolate_pos_encoding``) to the input's grid, which may be
    rectangular; the class token keeps its position. At the trained size the positions are used
    as they are. Pixels beyond the last whole patch are ignored (the stride-``patch_size``
    convolution drops them), as in OpenAI's model.

    Args:
        image_size: the trained input size (224 for ViT-B/32, ViT-B/16, ViT-L/14; 336 for
            ViT-L/14@336px).
        patch_size: pixels per patch side (32, 16, 14).
        width: transformer width (768 for ViT-B, 1024 for ViT-L).
        layers: residual attention blocks (12 for ViT-B, 24 for ViT-L).
        heads: attention heads (OpenAI: ``width // 64``).
        embed_dim: output size, columns of ``proj`` (512 for ViT-B, 768 for ViT-L).
        frozen: a teacher: no parameter requires grad and the module stays in eval mode.

    Raises:
        ValueError: when ``image_size`` is not a multiple of ``patch_size`` or ``width`` not one
            of ``heads``.

    Example::

        vit = load_openai_clip_vit("/data/clip/ViT-B-32.pt", frozen=True)
        out = vit.encode(pixels)                    # pixels in [0, 1], (B, 3, 224, 224)
        out.grid.shape, out.pooled.shape            # (B, 768, 7, 7), (B, 512)
        vit.encode(pixels, 448).grid.shape          # (B, 768, 14, 14): positions interpolated
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 32,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        embed_dim: int = 512,
        frozen: bool = False,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"image_size {image_size} is not a multiple of patch_size {patch_size}."
            )
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}.")
        self.image_size = image_size
        self.patch_size = patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        grid = image_size // patch_size
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))
        self.frozen = frozen
        if frozen:
            self.requires_grad_(False)
            self.train(False)

    @property
    def width(self) -> int:
        """Channels of the grid features (the transformer width)."""
        return int(self.conv1.out_channels)

    @property
    def embed_dim(self) -> int:
        """Size of the pooled (projected) features."""
        return int(self.proj.shape[1])

    def train(self, mode: bool = True) -> CLIPVisionTransformer:
        """As :meth:`torch.nn.Module.train`; a frozen encoder stays in eval mode."""
        return super().train(mode and not self.frozen)

    def positions(self, rows: int, cols: int) -> torch.Tensor:
        """The positional embeddings ``(1 + rows * cols, width)`` of a ``rows x cols`` patch
        grid: the learned ones at the trained grid, else the patch positions resized bicubically
        (``align_corners=False``) with the class position first, unchanged."""
        grid = self.image_size // self.patch_size
        if (rows, cols) == (grid, grid):
            return self.positional_embedding
        cls, patches = self.positional_embedding[:1], self.positional_embedding[1:]
        patches = patches.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=(rows, cols), mode="bicubic", align_corners=False)
        return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(rows * cols, -1)])

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The tokens ``(B, 1 + H/p * W/p, width)`` after the last block and ``ln_post`` of
        CLIP-normalised images ``(B, 3, H, W)``: the class token first, then the patches row by
        row."""
        if min(images.shape[-2:]) < self.patch_size:
            raise ValueError(
                f"images of {tuple(images.shape[-2:])} pixels are smaller than one patch "
                f"({self.patch_size}); resize them (the model was trained at {self.image_size})."
            )
        x = self.conv1(images.to(self.conv1.weight.dtype))
        rows, cols = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, rows * cols, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positions(rows, cols).to(x.dtype)
        x = self.transformer(self.ln_pre(x), None)
        return self.ln_post(x)

    def forward(self, images: torch.Tensor) -> CLIPViTFeatures:
        """The grid ``(B, width, H/p, W/p)`` and the pooled features ``(B, embed_dim)`` of
        CLIP-normalised images ``(B, 3, H, W)`` (:func:`clip_input`; OpenAI's ``model.visual``
        input)."""
        x = self.tokens(images)
        rows, cols = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        grid = x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, rows, cols)
        return CLIPViTFeatures(grid, x[:, 0] @ self.proj)

    def encode(self, pixels: torch.Tensor, image_size: int | None = None) -> CLIPViTFeatures:
        """:meth:`forward` on images ``(B, 3, H, W)`` in [0, 1], first resized to
        ``image_size`` square (``None``: as given) and normalised by :func:`clip_input`."""
        return self(clip_input(pixels, image_size))


# ---------------------------------------------------------------------- OpenAI checkpoints
def clip_vit_config(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The :class:`CLIPVisionTransformer` arguments of an OpenAI state dict (``visual.*`` keys),
    read from its shapes as OpenAI's ``build_model`` does: ``width`` and ``patch_size`` from
    ``conv1``, ``layers`` by counting ``resblocks``, ``heads = width // 64``, ``image_size``
    from the length of ``positional_embedding`` (a square grid plus the class position),
    ``embed_dim`` from ``proj``.

    Raises:
        ValueError: when the ViT tensors are absent (a ResNet checkpoint named as such), or the
            positions are not a square grid plus one.
    """
    if any(k.startswith(f"{_PREFIX}layer1.") for k in state):
        raise ValueError(
            "holds a CLIP ResNet image encoder (visual.layer1.*), not a ViT: load it with "
            "vlcompress.encoders.load_openai_clip_visual into build_clip_resnet(...), or pass "
            f"a ViT checkpoint ({', '.join(_VIT_FILES)})."
        )
    needed = [_PREFIX + k for k in ("conv1.weight", "class_embedding", "positional_embedding",
                                    "ln_post.weight", "proj")]  # fmt: skip
    absent = [k for k in needed if k not in state]
    if absent:
        raise ValueError(
            f"not an OpenAI CLIP ViT checkpoint: no {absent}; expected keys {needed} and "
            f"visual.transformer.resblocks.<i>.*; found {list(state)[:5]}."
        )
    conv = state[_PREFIX + "conv1.weight"]
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    positions = int(state[_PREFIX + "positional_embedding"].shape[0]) - 1
    grid = math.isqrt(max(positions, 0))
    if positions < 1 or grid * grid != positions:
        raise ValueError(
            f"visual.positional_embedding has {positions + 1} rows; expected a square patch "
            "grid plus the class position (50 for ViT-B/32 at 224: 7 x 7 + 1)."
        )
    blocks = f"{_PREFIX}transformer.resblocks."
    return {
        "image_size": grid * patch,
        "patch_size": patch,
        "width": width,
        "layers": len({k[len(blocks) :].split(".")[0] for k in state if k.startswith(blocks)}),
        "heads": max(1, width // 64),
        "embed_dim": int(state[_PREFIX + "proj"].shape[1]),
    }


def load_openai_clip_vit(
    path: str | Path | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    heads: int | None = None,
    *,
    frozen: bool = False,
) -> CLIPVisionTransformer:
    """CLIP's ViT image encoder from an OpenAI checkpoint, loaded strictly.

    The file is OpenAI's (``ViT-B-32.pt``, ``ViT-B-16.pt``, ``ViT-L-14.pt``: a TorchScript
    archive) or a state dict of the same keys, read by the ResNet loader's reader; the text
    tower and ``logit_scale`` are ignored, every ``visual.*`` tensor must fit the image encoder
    (sizes are read from the shapes by :func:`clip_vit_config`), half-precision tensors are cast
    to float32.

    Args:
        path: the checkpoint file.
        state: the tensors themselves instead of a file.
        heads: attention heads when not OpenAI's ``width // 64``.
        frozen: see :class:`CLIPVisionTransformer`.

    Returns:
        The encoder in eval mode.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: for a file without a CLIP ViT image tower (a ResNet one included), or
            missing / unexpected / differently-shaped tensors (named, with OpenAI's
            ``visual.`` keys).

    Example::

        vit = load_openai_clip_vit("/data/clip/ViT-B-16.pt")
        vit(clip_input(pixels, 224)).pooled.shape   # (B, 512)
    """
    if state is None:
        if path is None:
            raise ValueError("pass the path of an OpenAI CLIP ViT checkpoint (or its state dict).")
        state = _read_openai_checkpoint(Path(path).expanduser())
    where = f"CLIP checkpoint {str(path)!r}" if path is not None else "the CLIP state"
    try:
        config = clip_vit_config(state)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if heads is not None:
        config["heads"] = heads
    model = CLIPVisionTransformer(**config, frozen=frozen)
    visual = {k.removeprefix(_PREFIX): v for k, v in state.items() if k.startswith(_PREFIX)}
    ours = model.state_dict()
    missing = [_PREFIX + k for k in ours if k not in visual]
    unexpected = sorted(_PREFIX + k for k in visual if k not in ours)
    shapes = [
        f"{_PREFIX}{k}: checkpoint {tuple(v.shape)}, model {tuple(ours[k].shape)}"
        for k, v in visual.items()
        if k in ours and v.shape != ours[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{where} does not match OpenAI CLIP's ViT image encoder: missing "
            f"{missing or 'nothing'}; unexpected {unexpected or 'nothing'}; other shapes "
            f"{shapes or 'nothing'}. Pass an unmodified OpenAI ViT checkpoint "
            f"({', '.join(_VIT_FILES)}) or a state dict with exactly its visual.* keys."
        )
    model.load_state_dict({k: v.float() for k, v in visual.items()}, strict=True)
    log.info("loaded CLIP ViT image encoder from %s (%dpx, patch %d, width %d, %d layers, "
             "%d heads; %d tensors not used: text tower)", path or "a state dict",
             config["image_size"], config["patch_size"], config["width"], config["layers"],
             config["heads"], len(state) - len(visual))  # fmt: skip
    return model.eval()
