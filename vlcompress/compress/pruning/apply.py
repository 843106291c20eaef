"""Putting masks on weights: in place (magnitude pruning) or in the forward pass (mask training).

* :func:`zero_masked` multiplies weights by their masks in place: the model's tensors *are*
  the pruned weights, forward costs nothing extra, and any parameter works (LSTM weights too).
  Magnitude pruning calls it after every optimiser step, so pruned weights stay exactly zero.
* :class:`ForwardMasks` leaves the weights untouched and, during each call of the module owning
  a weight, shows the module ``weight * mask(scores)`` instead (the parameter keeps its name,
  so ``state_dict`` keys do not change). With :func:`threshold_mask` the mask is ``1[score >
  tau]`` and the gradient passes straight through to the scores (mask training).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "ForwardMasks",
    "masked_weight",
    "threshold_mask",
    "to_semi_structured",
    "zero_masked",
]


@torch.no_grad()
def zero_masked(params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """``param *= mask`` in place for every name in ``masks``."""
    for name, mask in masks.items():
        p = params[name]
        p.mul_(mask.to(device=p.device, dtype=p.dtype))


class _StraightThrough(torch.autograd.Function):
    """``1[scores > tau]`` forward; identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return (scores > tau).to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _MaskedWeight(torch.autograd.Function):
    """``weight * 1[scores > tau]`` in one pass; the gradient reaches the weight through the
    mask and the scores straight through the threshold (``grad * weight``). Saves a bool mask,
    not a float one."""

    @staticmethod
    def forward(
        ctx: Any,
        weight: torch.Tensor,
        scores: torch.Tensor,
        tau: float,
        tie: torch.Tensor | None,
    ) -> torch.Tensor:
        keep = scores > tau
        if tie is not None:
            keep |= tie & (scores == tau)
        ctx.save_for_backward(weight, keep)
        return torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        weight, keep = ctx.saved_tensors
        g_weight = grad * keep if ctx.needs_input_grad[0] else None
        g_scores = (grad * weight).to(grad.dtype) if ctx.needs_input_grad[1] else None
        return g_weight, g_scores, None, None


def masked_weight(
    weight: torch.Tensor, scores: torch.Tensor, tau: float, tie: torch.Tensor | None = None
) -> torch.Tensor:
    """``weight * 1[scores > tau]`` with straight-through gradients to ``scores`` (mask
    training); ``tie`` (bool, optional) keeps the scores equal to ``tau`` where it is True."""
    return _MaskedWeight.apply(weight, scores, float(tau), tie)


def threshold_mask(scores: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """Binary mask ``1[scores > tau]`` whose gradient flows straight through to ``scores``."""
    tau = torch.as_tensor(tau, dtype=scores.dtype, device=scores.device)
    return _StraightThrough.apply(scores, tau)


def _split(name: str) -> tuple[str, str]:
    owner, _, attr = name.rpartition(".")
    return owner, attr


def _show(masks: ForwardMasks, owner: str, module: nn.Module, _args: tuple) -> None:
    for attr, name in masks.by_owner[owner]:
        module.__dict__[attr] = masks.effective(name, module._parameters[attr])
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()


def _rows(masks: ForwardMasks, name: str, module: nn.Embedding, args: tuple, _out: Any) -> Any:
    """An embedding's output from its masked rows only: gathering first and masking the
    gathered rows equals masking the whole table first, for a fraction of the work."""
    ids = args[0]
    rows = torch.nn.functional.embedding(ids, module.weight, module.padding_idx)
    return masks.effective(name, rows, ids)


def _hide(masks: ForwardMasks, owner: str, module: nn.Module, _args: tuple, _out: Any) -> None:
    for attr, _name in masks.by_owner[owner]:
        module.__dict__.pop(attr, None)
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()


class ForwardMasks:
    """Masks applied in the forward pass of the modules owning the masked weights.

    Args:
        model: the model.
        names: parameter names (``"encoder.0.ffn.up.weight"``) to mask.
        mask_of: ``name -> mask tensor`` (called at every forward of the owning module, so it
            may depend on trainable scores); the effective weight is ``weight * mask``.
        effective: instead of ``mask_of``, ``(name, weight, rows) -> effective weight`` (e.g.
            built on :func:`masked_weight`, which fuses the threshold and the product). For a
            plain ``nn.Embedding`` only the looked-up rows are masked: ``weight`` is then those
            rows and ``rows`` their indices (``None`` for the whole table).

    ``remove()`` takes the hooks away and :meth:`bake` writes the masks into the weights.
    """

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        mask_of: Callable[[str], torch.Tensor] | None = None,
        effective: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        if (mask_of is None) == (effective is None):
            raise ValueError("ForwardMasks: give exactly one of mask_of and effective")
        self.model = model

        def from_mask(name: str, w: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
            mask = mask_of(name) if rows is None else mask_of(name)[rows]
            return w * mask.to(w.dtype)

        self.effective = effective or from_mask
        self.by_owner: dict[str, list[tuple[str, str]]] = {}
        for name in names:
            owner, attr = _split(name)
            module = model.get_submodule(owner)
            if attr not in module._parameters:
                raise ValueError(f"{name!r} is not a parameter of {type(module).__name__}")
            self.by_owner.setdefault(owner, []).append((attr, name))
        self.handles: list[Any] = []
        for owner in self.by_owner:
            module = model.get_submodule(owner)
            if type(module) is nn.Embedding and module.max_norm is None:
                ((_, name),) = self.by_owner[owner]
                self.handles.append(
                    module.register_forward_hook(functools.partial(_rows, self, name))
                )
                continue
            self.handles.append(
                module.register_forward_pre_hook(functools.partial(_show, self, owner))
            )
            self.handles.append(module.register_forward_hook(functools.partial(_hide, self, owner)))

    @torch.no_grad()
    def bake(self) -> None:
        """Multiply every weight by its current mask in place (then :meth:`remove`)."""
        for owner, pairs in self.by_owner.items():
            module = self.model.get_submodule(owner)
            for attr, name in pairs:
                w = module._parameters[attr]
                w.copy_(self.effective(name, w).detach())

    def remove(self) -> None:
        """Take the hooks away (the model computes with its own weights again)."""
        for h in self.handles:
            h.remove()
        self.handles = []


def to_semi_structured(model: nn.Module, names: list[str]) -> list[str]:
    """Swap 2:4-pruned ``nn.Linear`` weights for ``torch.sparse`` semi-structured tensors (GPU
    sparse tensor cores; inference only).

    Args:
        model: the model, on a CUDA device, in fp16 / bf16.
        names: weight names already pruned 2:4 (e.g. by ``MagnitudePruning(granularity="n:m")``).

    Returns:
        The names converted (weights of other module types are left dense).

    Raises:
        RuntimeError: the weights are not on a CUDA device (the kernels exist only there).
    """
    from torch.sparse import to_sparse_semi_structured

    done = []
    for name in names:
        owner, attr = _split(name)
        module = model.get_submodule(owner)
        if not isinstance(module, nn.Linear) or attr != "weight":
            continue
        w = module.weight
        if w.device.type != "cuda":
            raise RuntimeError(
                f"2:4 semi-structured sparsity runs only on CUDA; {name} is on {w.device}. Move "
                "the model to a GPU (model.cuda().half()) before converting, or keep the masked "
                "dense weights on the CPU"
            )
        module.weight = nn.Parameter(to_sparse_semi_structured(w.detach()), requires_grad=False)
        done.append(name)
    return done
