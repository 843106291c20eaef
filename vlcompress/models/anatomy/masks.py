"""Switching attention heads and feed-forward units off, for every projection layout.

How a head is switched off depends on how its block is built (see
:data:`~vlcompress.models.anatomy.specs.ATTENTION_LAYOUTS`):

* a module with ``supports_head_mask = True`` receives the mask as its ``head_mask`` attribute
  (MCAN: the attention kernel then skips dead heads);
* ``separate``: the head's slice of the output projection's input is multiplied by the mask;
* ``fused``: the head's value rows of the ``qkv`` output are multiplied by the mask;
* ``packed`` (``nn.MultiheadAttention``, whose ``out_proj`` runs functionally and never calls
  hooks): during the module's forward, ``in_proj_weight`` / ``in_proj_bias`` (or
  ``v_proj_weight``) are shadowed by copies whose value rows of the dead heads are multiplied by
  the mask; the parameters keep their names.

Zeroing a head's values (or its context) zeroes its context exactly, and its query and key rows
then get exactly zero gradient. For hook-based layouts a *witness* checks, at every call of the
attention block, that the gate ran: a mask that cannot take effect raises ``RuntimeError``
instead of doing nothing. FFN unit masks multiply the input of the down projection, with the
same check. A bypassed layer (:class:`~vlcompress.models.anatomy.bypass.LayerBypass`) shares
its layer's hooks but runs none of its blocks: its masks wait, unchecked, until the layer is
restored.

Masks stack per block: the latest applies, and removing its handle brings back the one before
(or none). A float mask that requires grad receives gradients (head-importance scores).
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import torch
from torch import nn

from vlcompress.models.anatomy.bypass import LayerBypass
from vlcompress.models.anatomy.specs import AttentionSpec, FFNSpec

__all__ = ["MaskHandle", "add_head_mask", "add_unit_mask", "head_weights"]

_GATE_KEY = "_vlcompress_gates"
_tokens = itertools.count()


class _Gate:
    """The masks applied to one block, newest last, and the hooks that apply them.

    It refers to modules only through attributes (no closures), so a deep copy of the model
    carries a working copy of its masks.
    """

    def __init__(self, what: str, fix: str, owner: nn.Module, kind: str) -> None:
        self.what, self.fix, self.owner, self.kind = what, fix, owner, kind
        self.stack: list[tuple[int, torch.Tensor]] = []
        self.fired = False
        self.handles: list[Any] = []
        self.native = False  # the owner takes the mask itself (``supports_head_mask``)
        self.base: Any = None  # the owner's ``head_mask`` before the first mask

    @property
    def mask(self) -> torch.Tensor:
        return self.stack[-1][1]

    def push(self, mask: torch.Tensor) -> MaskHandle:
        token = next(_tokens)
        self.stack.append((token, mask))
        if self.native:
            self.owner.head_mask = mask
        return MaskHandle(self, token)

    def pop(self, token: int) -> None:
        before = len(self.stack)
        self.stack = [(t, m) for t, m in self.stack if t != token]
        if len(self.stack) == before:
            return
        if self.stack:
            if self.native:
                self.owner.head_mask = self.mask
            return
        for h in self.handles:
            h.remove()
        if self.native:
            self.owner.head_mask = self.base
        self.owner.__dict__.get(_GATE_KEY, {}).pop(self.kind, None)


class MaskHandle:
    """Undoes one mask (``handle.remove()``), like ``torch.utils.hooks.RemovableHandle``."""

    def __init__(self, gate: _Gate, token: int) -> None:
        self._gate, self._token = gate, token

    def remove(self) -> None:
        """Remove this mask; the previous one (or none) applies again. Idempotent."""
        self._gate.pop(self._token)


def _gates(module: nn.Module) -> dict[str, _Gate]:
    if _GATE_KEY not in module.__dict__:
        module.__dict__[_GATE_KEY] = {}
    return module.__dict__[_GATE_KEY]


def _expand(mask: torch.Tensor, like: torch.Tensor, group: int) -> torch.Tensor:
    return mask.to(device=like.device, dtype=like.dtype).repeat_interleave(group)


# ---------------------------------------------------------------------- hooks
def _gate_input(gate: _Gate, group: int, _m: nn.Module, args: tuple) -> tuple:
    gate.fired = True
    x = args[0]
    return (x * _expand(gate.mask, x, group), *args[1:])


def _gate_values(gate: _Gate, group: int, width: int, _m: nn.Module, _a: tuple, out: Any) -> Any:
    gate.fired = True
    keep = _expand(gate.mask, out, group)
    ones = torch.ones(2 * width, device=out.device, dtype=out.dtype)
    return out * torch.cat([ones, keep])


def _witness_start(gate: _Gate, _m: nn.Module, _a: tuple) -> None:
    gate.fired = False


def _witness_check(gate: _Gate, m: nn.Module, _a: tuple, _o: Any) -> None:
    # A bypass shares its layer's hook dicts; the masked parts of a bypassed layer do not
    # run, so its masks rightly take no effect.
    if not gate.fired and not isinstance(m, LayerBypass):
        raise RuntimeError(
            f"the mask on {gate.what} did not take effect: {gate.fix} Remove the mask "
            "(handle.remove()) or fix the declaration."
        )


def _watch(gate: _Gate, module: nn.Module) -> None:
    """Make every call of ``module`` check that ``gate`` ran during it (the witness)."""
    gate.handles.append(module.register_forward_pre_hook(functools.partial(_witness_start, gate)))
    gate.handles.append(module.register_forward_hook(functools.partial(_witness_check, gate)))


def _shadow_values(gate: _Gate, group: int, width: int, m: nn.Module, _a: tuple) -> None:
    keep = gate.mask
    if m.__dict__.get("_qkv_same_embed_dim", True):
        w = m._parameters["in_proj_weight"]
        rows = torch.cat(
            [torch.ones(2 * width, device=w.device, dtype=w.dtype), _expand(keep, w, group)]
        )
        m.__dict__["in_proj_weight"] = w * rows[:, None]
    else:
        w = m._parameters["v_proj_weight"]
        m.__dict__["v_proj_weight"] = w * _expand(keep, w, group)[:, None]
        rows = torch.cat(
            [torch.ones(2 * width, device=w.device, dtype=w.dtype), _expand(keep, w, group)]
        )
    b = m._parameters.get("in_proj_bias")
    if b is not None:
        m.__dict__["in_proj_bias"] = b * rows.to(b.dtype)
    gate.fired = True


def _unshadow(_gate: _Gate, m: nn.Module, _a: tuple, _o: Any) -> None:
    for name in ("in_proj_weight", "v_proj_weight", "in_proj_bias"):
        m.__dict__.pop(name, None)


# ---------------------------------------------------------------------- heads
def _check_mask(mask: torch.Tensor, size: int, what: str) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"the mask for {what} must be a tensor, got {type(mask).__name__}.")
    if tuple(mask.shape) != (size,):
        raise ValueError(f"the mask for {what} must have shape ({size},), got {tuple(mask.shape)}.")


def _linear(model: nn.Module, path: str, what: str) -> nn.Module:
    module = model.get_submodule(path)
    if not isinstance(module, nn.Linear):
        raise TypeError(
            f"{what}: {path!r} is a {type(module).__name__}, not an nn.Linear; check the "
            "attention layout in the anatomy."
        )
    return module


def add_head_mask(model: nn.Module, spec: AttentionSpec, mask: torch.Tensor) -> MaskHandle:
    """Switch off the heads of ``spec`` where ``mask`` is 0 (see the module docstring).

    Args:
        model: the model holding the block.
        spec: the attention block.
        mask: ``(num_heads,)``; 1 keeps a head, 0 removes it (float values scale it).

    Returns:
        A handle whose ``remove()`` brings back the previous mask (or none).

    Raises:
        ValueError: for a mask of the wrong shape or a projection of the wrong size.
        TypeError: when a declared projection is not of the declared kind.
    """
    what = f"attention block {spec.name!r}"
    _check_mask(mask, spec.num_heads, what)
    module = model.get_submodule(spec.name)
    gate = _gates(module).get("heads")
    if gate is not None:
        return gate.push(mask)
    gate = _Gate(what, "", module, "heads")
    if getattr(module, "supports_head_mask", False):
        gate.native, gate.base = True, getattr(module, "head_mask", None)
    elif spec.layout == "separate":
        out = _linear(model, spec.out, what)
        if out.in_features != spec.width:
            raise ValueError(
                f"{what}: its output projection {spec.out!r} takes {out.in_features} "
                f"features, not num_heads x head_dim = {spec.width}."
            )
        gate.fix = (
            f"its output projection {spec.out!r} was not called as a module during the "
            "block's forward (its weight is used functionally). Declare the block with "
            "layout='packed' (nn.MultiheadAttention) or 'fused', or give the module "
            "`supports_head_mask`."
        )
        hook = functools.partial(_gate_input, gate, spec.head_dim)
        gate.handles.append(out.register_forward_pre_hook(hook))
    elif spec.layout == "fused":
        qkv = _linear(model, spec.v, what)
        if qkv.out_features != 3 * spec.width:
            raise ValueError(
                f"{what}: its fused projection {spec.v!r} has {qkv.out_features} outputs, "
                f"not 3 x num_heads x head_dim = {3 * spec.width}."
            )
        gate.fix = (
            f"its fused projection {spec.v!r} was not called as a module during the block's "
            "forward. Declare the block's real layout."
        )
        hook = functools.partial(_gate_values, gate, spec.head_dim, spec.width)
        gate.handles.append(qkv.register_forward_hook(hook))
    else:  # packed
        mha = model.get_submodule(spec.v)
        if "in_proj_weight" not in mha._parameters and "v_proj_weight" not in mha._parameters:
            raise TypeError(
                f"{what}: {spec.v!r} is a {type(mha).__name__} without in_proj_weight or "
                "v_proj_weight; layout='packed' is for nn.MultiheadAttention."
            )
        embed = getattr(mha, "embed_dim", spec.width)
        heads = getattr(mha, "num_heads", spec.num_heads)
        if embed != spec.width or heads != spec.num_heads:
            raise ValueError(
                f"{what}: the module has embed_dim {embed} and {heads} heads; the anatomy says "
                f"{spec.num_heads} heads of {spec.head_dim}."
            )
        shadow = functools.partial(_shadow_values, gate, spec.head_dim, spec.width)
        gate.handles.append(mha.register_forward_pre_hook(shadow))
        unshadow = functools.partial(_unshadow, gate)
        gate.handles.append(mha.register_forward_hook(unshadow, always_call=True))
    if spec.layout != "packed" and not gate.native:
        _watch(gate, module)
    _gates(module)["heads"] = gate
    return gate.push(mask)


def add_unit_mask(
    model: nn.Module, spec: FFNSpec, mask: torch.Tensor, layer: str | None = None
) -> MaskHandle:
    """Switch off the FFN units of ``spec`` where ``mask`` is 0 (the down projection's input).

    A witness checks, at every call of the module holding the down projection, that the mask
    was applied: ``spec.name`` when it is a module of its own, else (a logical name such as
    ``"<layer>.ffn"``, or the down projection's own path) ``layer``.

    Args:
        model: the model holding the block.
        spec: the feed-forward block.
        mask: ``(inner_dim,)``; 1 keeps a unit, 0 removes it.
        layer: path of the layer holding the block (``None``: no witness when ``spec.name`` is
            not a module of its own).

    Returns:
        A handle whose ``remove()`` brings back the previous mask (or none).

    Raises:
        ValueError: for a mask of the wrong shape or a projection of the wrong size.
    """
    what = f"FFN block {spec.name!r}"
    _check_mask(mask, spec.inner_dim, what)
    down = _linear(model, spec.down, what)
    if down.in_features != spec.inner_dim:
        raise ValueError(
            f"{what}: its down projection {spec.down!r} takes {down.in_features} features, "
            f"not inner_dim = {spec.inner_dim}."
        )
    gate = _gates(down).get("units")
    if gate is not None:
        return gate.push(mask)
    gate = _Gate(
        what,
        f"its down projection {spec.down!r} was not called as a module (its weight is used "
        "functionally).",
        down,
        "units",
    )
    gate.handles.append(down.register_forward_pre_hook(functools.partial(_gate_input, gate, 1)))
    modules = dict(model.named_modules())
    # The witness must not be the down projection itself: its pre-hook would run after the
    # gate's and reset what the gate recorded.
    container = next(
        (p for p in (spec.name, layer) if p is not None and p in modules and p != spec.down), None
    )
    if container is not None:
        _watch(gate, modules[container])
    _gates(down)["units"] = gate
    return gate.push(mask)


def head_weights(
    model: nn.Module, spec: AttentionSpec, head: int
) -> dict[str, tuple[nn.Parameter, tuple[slice, slice]]]:
    """Where head ``head`` lives in the weights: ``{"q"|"k"|"v": (weight, rows), "out":
    (weight, columns)}``, each index a ``(rows, columns)`` pair of slices.

    Args:
        model: the model holding the block.
        spec: the attention block.
        head: the head index.

    Returns:
        ``weight[index]`` is that head's part of each projection (also for ``weight.grad``).

    Raises:
        IndexError: for a head out of range.

    Example::

        w, idx = anatomy.head_weights(model, "encoder.layer.0.attention", 3)["q"]
        w.grad[idx]  # the gradient of head 3's query rows
    """
    if not 0 <= head < spec.num_heads:
        raise IndexError(f"head {head} out of range for {spec.name!r} ({spec.num_heads} heads).")
    hd, width = spec.head_dim, spec.width
    rows = slice(head * hd, (head + 1) * hd)
    every = slice(None)
    out = model.get_submodule(spec.out).weight
    result: dict[str, tuple[nn.Parameter, tuple[slice, slice]]] = {"out": (out, (every, rows))}
    if spec.layout == "separate":
        for role in ("q", "k", "v"):
            result[role] = (model.get_submodule(getattr(spec, role)).weight, (rows, every))
        return result
    module = model.get_submodule(spec.v)
    if spec.layout == "packed" and "in_proj_weight" not in module._parameters:
        for role in ("q", "k", "v"):
            result[role] = (module._parameters[f"{role}_proj_weight"], (rows, every))
        return result
    weight = module.weight if spec.layout == "fused" else module._parameters["in_proj_weight"]
    for i, role in enumerate(("q", "k", "v")):
        result[role] = (weight, (slice(i * width + rows.start, i * width + rows.stop), every))
    return {k: result[k] for k in ("q", "k", "v", "out")}
