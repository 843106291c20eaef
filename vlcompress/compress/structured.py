"""Physical removal of attention heads and feed-forward units (structured pruning made real).

Masks (:meth:`Anatomy.mask_heads`, :meth:`Anatomy.mask_ffn_units`) switch heads and units off
while the model keeps its size. :func:`remove_heads` and :func:`remove_ffn_units` make such a
decision permanent: the projections are replaced by smaller ``nn.Linear`` modules, so the model
really has fewer parameters and runs faster. The reduced model computes exactly what the masked
model computed (up to float summation order).

* heads (layouts ``separate`` and ``fused``): the kept heads' rows of q, k and v (weights and
  biases) and their input columns of the output projection are kept; the attention module's
  head-count attribute (``num_attention_heads``, ``num_heads``, ``n_heads``, ``n_head``) and,
  where it has one, its width attribute (``all_head_size``, ``head_size`` (LXMERT), ``attn_dim``
  (timm)) are set to the new values. Packed blocks (``nn.MultiheadAttention``) are refused: their
  ``embed_dim`` is both the model width and the heads' width.
* FFN units: the kept rows of the up projection (+ bias) and columns of the down projection.

Removing *every* head of a block, or every unit of an FFN, is refused with a ``ValueError``: an
anatomy cannot describe a block of size zero, and a layer that should vanish is better skipped
(:meth:`Anatomy.bypass_layer`) or kept with its single most important head.

Transformers 5 no longer has ``prune_heads`` on its attention modules; its
``pytorch_utils.prune_linear_layer`` builds the new layer in the default dtype (an fp16 model
would get fp32 layers) and draws a random initialisation from the global RNG. The slicing here
keeps dtype, device and ``requires_grad`` and draws no random numbers.

The anatomy given to these functions describes the model *before* removal. Use the one they
return (:attr:`StructuredRemoval.anatomy`); ``anatomy_of(model)`` derives the same one again,
since the head counts and FFN sizes are read from the modules.

Example::

    result = remove_heads(model, anatomy, {"encoder.layer.0.attention": [0, 2, 3]})
    result = remove_ffn_units(model, result.anatomy, {"encoder.layer.0.ffn": keep_mask})
    anatomy = result.anatomy          # the model's anatomy from now on
    json.dump(result.kept, f)         # re-apply to a fresh model before load_state_dict
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from vlcompress.models.anatomy import Anatomy, AttentionSpec, FFNSpec
from vlcompress.models.anatomy.masks import _GATE_KEY

__all__ = [
    "HEAD_COUNT_ATTRS",
    "HEAD_WIDTH_ATTRS",
    "Keep",
    "StructuredRemoval",
    "kept_indices",
    "remove_ffn_units",
    "remove_heads",
    "sliced_linear",
]

log = logging.getLogger(__name__)

HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
"""Integer attributes holding an attention module's head count (updated on removal)."""

HEAD_WIDTH_ATTRS = ("all_head_size", "head_size", "attn_dim")
"""Integer attributes holding ``num_heads x head_dim`` (updated on removal when equal to it)."""

Keep = torch.Tensor | Sequence[int]
"""What to keep: a bool or float mask of the block's size (non-zero = keep), or indices (an
integer tensor or a sequence of ints, in the original numbering)."""

_PLAIN_LINEARS = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


@dataclass(frozen=True)
class StructuredRemoval:
    """What a removal did.

    Attributes:
        anatomy: the anatomy of the reduced model (a new object; the one passed in is stale).
        kept: for every block named in ``keep``, the kept head (or unit) indices in the
            numbering of the model as it was before this call; plain ints, JSON-serialisable.
            Passing it to the same function on a fresh model of the original shape rebuilds
            the reduced shapes (then ``load_state_dict``).
        removed_parameters: how many parameters the model lost.
    """

    anatomy: Anatomy
    kept: dict[str, list[int]]
    removed_parameters: int


def kept_indices(keep: Keep, size: int, what: str) -> list[int]:
    """The sorted indices that ``keep`` keeps out of ``size``.

    Args:
        keep: a bool / float mask of shape ``(size,)`` (non-zero keeps), or indices (an integer
            tensor or a sequence of ints).
        size: the number of heads or units of the block.
        what: the block, for error messages.

    Returns:
        Sorted, distinct indices in ``[0, size)``.

    Raises:
        TypeError: for something that is neither a tensor nor a sequence of ints.
        ValueError: for a mask of the wrong shape, or indices out of range or repeated.
    """
    if isinstance(keep, torch.Tensor):
        if keep.dtype == torch.bool or keep.is_floating_point():
            if tuple(keep.shape) != (size,):
                raise ValueError(
                    f"the keep mask for {what} must have shape ({size},), got "
                    f"{tuple(keep.shape)}; give a mask with one entry per head / unit, or "
                    "an integer tensor of indices."
                )
            return torch.nonzero(keep.detach()).flatten().tolist()
        values: list = keep.detach().flatten().tolist()
    elif isinstance(keep, Sequence) and not isinstance(keep, (str, bytes)):
        values = list(keep)
    else:
        raise TypeError(
            f"keep for {what} must be a mask tensor or a sequence of indices, got "
            f"{type(keep).__name__}."
        )
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise TypeError(
            f"indices for {what} must be ints, got {values!r}; for a mask, give a bool or "
            "float tensor."
        )
    bad = [v for v in values if not 0 <= v < size]
    if bad:
        raise ValueError(f"indices {bad} for {what} are out of range [0, {size}).")
    if len(set(values)) != len(values):
        raise ValueError(f"indices for {what} repeat: {sorted(values)}.")
    return sorted(values)


def sliced_linear(layer: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new ``nn.Linear`` holding ``layer``'s outputs (``dim=0``) or inputs (``dim=1``) at
    ``index``; same dtype, device, bias presence and ``requires_grad``; no random draws.

    Args:
        layer: the layer to slice.
        index: 1-D integer tensor of the rows (``dim=0``) or columns (``dim=1``) to keep.
        dim: 0 for outputs, 1 for inputs.

    Returns:
        The smaller layer (``layer`` is left unchanged).

    Raises:
        ValueError: for ``dim`` other than 0 or 1.
    """
    if dim not in (0, 1):
        raise ValueError(f"dim must be 0 (outputs) or 1 (inputs), got {dim}.")
    w = layer.weight
    index = index.to(w.device)
    out_f = len(index) if dim == 0 else layer.out_features
    in_f = len(index) if dim == 1 else layer.in_features
    new = nn.utils.skip_init(
        nn.Linear, in_f, out_f, bias=layer.bias is not None, device=w.device, dtype=w.dtype
    )
    with torch.no_grad():
        new.weight.copy_(w.index_select(dim, index))
        if layer.bias is not None:
            new.bias.copy_(layer.bias.index_select(0, index) if dim == 0 else layer.bias)
    new.weight.requires_grad_(w.requires_grad)
    if layer.bias is not None:
        new.bias.requires_grad_(layer.bias.requires_grad)
    new.train(layer.training)
    return new


# ---------------------------------------------------------------------- helpers
def _module(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(
            f"{what}: {path!r} is not a module of the model (is its layer bypassed? restore it "
            "with anatomy.replace_layer first, or check the anatomy)."
        ) from None


def _plain_linear(model: nn.Module, path: str, what: str) -> nn.Linear:
    m = _module(model, path, what)
    if parametrize.is_parametrized(m):
        raise TypeError(
            f"{what}: {path!r} carries a torch parametrization; make it permanent first "
            "(torch.nn.utils.parametrize.remove_parametrizations(module, 'weight', "
            "leave_parametrized=True))."
        )
    if type(m) not in _PLAIN_LINEARS:
        raise TypeError(
            f"{what}: {path!r} is a {type(m).__name__}, not a plain nn.Linear; it would be "
            "replaced by one and lose what its class adds. Turn it into an nn.Linear with the "
            "weights it computes with (e.g. bake a weight mask in) before removing structure."
        )
    return m


def _check_unmasked(module: nn.Module, kind: str, what: str, fix: str) -> None:
    if kind in module.__dict__.get(_GATE_KEY, {}) or (
        kind == "heads" and getattr(module, "head_mask", None) is not None
    ):
        raise ValueError(
            f"{what} has an active {kind} mask; remove it first (handle.remove() on the "
            f"handles {fix} returned) and pass what it keeps as `keep`."
        )


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _count(modules: Sequence[nn.Module]) -> int:
    seen = {id(p): p.numel() for m in modules for p in m.parameters()}
    return sum(seen.values())


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def head_size_attributes(
    model: nn.Module, spec: AttentionSpec, what: str, required: bool = True
) -> list[tuple[nn.Module, str, str]]:
    """``(module, attribute, "count" | "width")`` for every head-count / width attribute of
    the attention block's modules (projections excluded) that equals the declared value
    (ints only: a bool flag never matches).

    Args:
        model: the model holding the block.
        spec: the block's attention spec.
        what: the block, for messages.
        required: raise when no head-count attribute is found (a model whose attention reads
            its head count from the tensor shapes needs none: pass ``False``).

    Raises:
        ValueError: with ``required``, when no module has a head-count attribute.
    """
    block = _module(model, spec.name, what)
    projections = {id(_module(model, p, what)) for p in spec.projections}
    found = []
    for m in block.modules():
        if id(m) in projections:
            continue
        for names, value, role in (
            (HEAD_COUNT_ATTRS, spec.num_heads, "count"),
            (HEAD_WIDTH_ATTRS, spec.width, "width"),
        ):
            for attr in names:
                v = m.__dict__.get(attr)
                if isinstance(v, int) and not isinstance(v, bool) and v == value:
                    found.append((m, attr, role))
    if required and not any(role == "count" for _, _, role in found):
        raise ValueError(
            f"{what}: none of its modules has a head-count attribute {list(HEAD_COUNT_ATTRS)} "
            f"equal to its {spec.num_heads} heads, so its forward could not be told the new "
            "count. Give the attention module one of these attributes (and use it in forward)."
        )
    return found


def set_head_sizes(attrs: list[tuple[nn.Module, str, str]], heads: int, head_dim: int) -> None:
    """Write a new head count (and the width it makes) into the attributes found by
    :func:`head_size_attributes`."""
    for module, attr, role in attrs:
        setattr(module, attr, heads if role == "count" else heads * head_dim)


def _new_anatomy(
    anatomy: Anatomy,
    attentions: Mapping[str, AttentionSpec] | None = None,
    ffns: Mapping[str, FFNSpec] | None = None,
) -> Anatomy:
    new = copy.deepcopy(anatomy)
    attentions, ffns = attentions or {}, ffns or {}
    new.attentions = [attentions.get(a.name, a) for a in new.attentions]
    new.ffns = [ffns.get(f.name, f) for f in new.ffns]
    return new


# ---------------------------------------------------------------------- heads
def remove_heads(model: nn.Module, anatomy: Anatomy, keep: Mapping[str, Keep]) -> StructuredRemoval:
    """Physically remove attention heads: keep only ``keep[name]`` in each named block.

    Every block is checked before anything changes; blocks that keep all their heads are left
    untouched (no module is replaced).

    Args:
        model: the model (changed in place: its projections are replaced).
        anatomy: the model's current anatomy.
        keep: ``{attention block name: heads to keep}``, a mask (bool / float, non-zero keeps)
            or indices (see :data:`Keep`).

    Returns:
        A :class:`StructuredRemoval`; its ``anatomy`` describes the reduced model.

    Raises:
        KeyError: for an unknown block (the known ones are listed).
        ValueError: for a packed block, a keep that keeps no head, a block with an active head
            mask, a block inside a bypassed layer, or one without a head-count attribute.
        TypeError: for a projection that is not a plain ``nn.Linear``, or a bad ``keep``.

    Example::

        result = remove_heads(model, anatomy, {"encoder.layer.0.attention": [0, 3]})
        result.anatomy.attention("encoder.layer.0.attention").num_heads  # 2
    """
    plans = []
    for name, want in keep.items():
        spec = anatomy.attention(name)
        what = f"attention block {name!r}"
        if spec.layout == "packed":
            raise ValueError(
                f"{what} is packed (nn.MultiheadAttention), whose heads cannot be removed: "
                "its embed_dim is both the model width and the heads' width. Supported "
                "layouts: 'separate', 'fused'. Mask its heads (anatomy.mask_heads) instead."
            )
        heads = kept_indices(want, spec.num_heads, what)
        if not heads:
            raise ValueError(
                f"{what}: keep removes all {spec.num_heads} heads; keep at least one (e.g. "
                "the most important), or skip its layer with anatomy.bypass_layer."
            )
        if len(heads) == spec.num_heads:
            plans.append((spec, heads, {}, []))  # nothing to remove: left untouched
            continue
        linears = {p: _plain_linear(model, p, what) for p in spec.projections}
        _check_unmasked(_module(model, name, what), "heads", what, "anatomy.mask_heads")
        attrs = head_size_attributes(model, spec, what)
        plans.append((spec, heads, linears, attrs))

    kept: dict[str, list[int]] = {}
    new_specs: dict[str, AttentionSpec] = {}
    removed = 0
    for spec, heads, linears, attrs in plans:
        kept[spec.name] = heads
        if len(heads) == spec.num_heads:
            continue
        before = _count(list(linears.values()))
        rows = _head_rows(heads, spec.head_dim)
        if spec.layout == "fused":
            w = spec.width
            qkv = sliced_linear(linears[spec.v], torch.cat([rows, rows + w, rows + 2 * w]), 0)
            new = {spec.v: qkv}
        else:
            new = {p: sliced_linear(linears[p], rows, 0) for p in {spec.q, spec.k, spec.v}}
        new[spec.out] = sliced_linear(linears[spec.out], rows, 1)
        for path, module in new.items():
            _set(model, path, module)
        set_head_sizes(attrs, len(heads), spec.head_dim)
        removed += before - _count(list(new.values()))
        new_specs[spec.name] = dataclasses.replace(spec, num_heads=len(heads))
        log.debug("%s: kept heads %s of %d", spec.name, heads, spec.num_heads)
    if new_specs:
        log.info("removed heads in %d attention block(s): %d parameters", len(new_specs), removed)
    return StructuredRemoval(_new_anatomy(anatomy, attentions=new_specs), kept, removed)


# ---------------------------------------------------------------------- FFN units
def remove_ffn_units(
    model: nn.Module, anatomy: Anatomy, keep: Mapping[str, Keep]
) -> StructuredRemoval:
    """Physically remove feed-forward units: keep only ``keep[name]`` in each named block.

    Every block is checked before anything changes; blocks that keep all their units are left
    untouched.

    Args:
        model: the model (changed in place: up and down projections are replaced).
        anatomy: the model's current anatomy.
        keep: ``{FFN block name: units to keep}``, a mask (bool / float, non-zero keeps) or
            indices (see :data:`Keep`).

    Returns:
        A :class:`StructuredRemoval`; its ``anatomy`` describes the reduced model.

    Raises:
        KeyError: for an unknown block (the known ones are listed).
        ValueError: for a keep that keeps no unit, a block with an active unit mask, a block
            inside a bypassed layer, or projections whose sizes disagree with the anatomy.
        TypeError: for a projection that is not a plain ``nn.Linear``, or a bad ``keep``.

    Example::

        result = remove_ffn_units(model, anatomy, {"encoder.0.ffn": scores > threshold})
    """
    plans = []
    for name, want in keep.items():
        spec = anatomy.ffn(name)
        what = f"FFN block {name!r}"
        units = kept_indices(want, spec.inner_dim, what)
        if not units:
            raise ValueError(
                f"{what}: keep removes all {spec.inner_dim} units; keep at least one, or "
                "skip its layer with anatomy.bypass_layer."
            )
        if len(units) == spec.inner_dim:
            plans.append((spec, units, None, None))  # nothing to remove: left untouched
            continue
        up = _plain_linear(model, spec.up, what)
        down = _plain_linear(model, spec.down, what)
        if up.out_features != spec.inner_dim or down.in_features != spec.inner_dim:
            raise ValueError(
                f"{what}: up has {up.out_features} outputs and down takes {down.in_features} "
                f"inputs, but the anatomy says inner_dim = {spec.inner_dim}; use the anatomy "
                "of the model as it is now (the one the last removal returned)."
            )
        _check_unmasked(down, "units", what, "anatomy.mask_ffn_units")
        plans.append((spec, units, up, down))

    kept: dict[str, list[int]] = {}
    new_specs: dict[str, FFNSpec] = {}
    removed = 0
    for spec, units, up, down in plans:
        kept[spec.name] = units
        if len(units) == spec.inner_dim:
            continue
        index = torch.tensor(units)
        new_up, new_down = sliced_linear(up, index, 0), sliced_linear(down, index, 1)
        _set(model, spec.up, new_up)
        _set(model, spec.down, new_down)
        removed += _count([up, down]) - _count([new_up, new_down])
        new_specs[spec.name] = dataclasses.replace(spec, inner_dim=len(units))
        log.debug("%s: kept %d of %d units", spec.name, len(units), spec.inner_dim)
    if new_specs:
        log.info("removed units in %d FFN block(s): %d parameters", len(new_specs), removed)
    return StructuredRemoval(_new_anatomy(anatomy, ffns=new_specs), kept, removed)
