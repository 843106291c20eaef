"""Width and depth slimming of any anatomy-declared transformer, by slicing weights at run time.

One set of weights holds many submodels (Bilaterally Slimmable Transformer, seed 001). A
submodel ``(width w, depth d)``:

* **width** — every ``nn.Linear`` / ``nn.Embedding`` in the anatomy's width region
  (:class:`~vlcompress.models.anatomy.SlimSpec`) uses only its first outputs: attention
  q / k / v projections their first ``⌊H·w⌋`` whole heads (head size fixed), FFN up
  projections their first ``⌊F·w⌋`` units, every other one its first ``⌊n·w⌋`` outputs (the
  hidden width itself, the output projections). Every ``nn.Linear`` and ``nn.LayerNorm`` of the
  model reads only as many input features as it is given (the first columns of its weight, the
  first affine parameters), so the narrower stream flows through the whole model and a task
  head outside the region reads it unchanged in its outputs;
* **depth** — each stack keeps its first ``⌊L·d⌋`` layers in the declared priority order and
  runs them in index order; the others are skipped in place
  (:meth:`~vlcompress.models.anatomy.Anatomy.skip_layer`).

Slicing is a view: no weight is copied and no mask multiplies anything, so the compute really
falls, and the attention kernel sees only the live heads. At ``w = d = 1`` the modules run their
plain forward: the model is exactly the original one. (LayerNorms over several dimensions are
not width-sliced and left as they are.) A module outside the region reads the *first* features
it is given: fine for a task head on the slimmed stream, wrong for one reading a concatenation
of two slimmed streams, which must then be inside the region or reorder its inputs. The modules keep their class's
``state_dict`` layout (they are instances of thin subclasses of ``nn.Linear``,
``nn.LayerNorm``, ``nn.Embedding`` while attached), so optimisers and checkpoints see no change.

Example::

    slim = Slimmable(model)                   # anatomy_of(model) unless given
    with slim.submodel(0.5, 1 / 3):
        logits = model(batch)                 # half the width, a third of the layers
    small = slim.export(Submodel(0.25, 1 / 6), batch)   # a physically smaller plain copy
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlcompress.models.anatomy import Anatomy, SlimSpec, anatomy_of
from vlcompress.models.anatomy.specs import scaled
from vlcompress.models.contract import options_of

__all__ = [
    "TRIANGLE",
    "SlicedEmbedding",
    "SlicedLayerNorm",
    "SlicedLinear",
    "Slimmable",
    "Submodel",
    "logits_in",
    "parse_space",
    "scaled",
    "width_problems",
]

log = logging.getLogger(__name__)


def logits_in(output: Any) -> torch.Tensor | None:
    """The logits in a model's output: the tensor itself, the first item of a tuple, or
    ``.logits``; ``None`` when there are none (e.g. a base model's hidden states)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else None


def _fraction_text(x: float) -> str:
    f = Fraction(x).limit_denominator(24)
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


@dataclass(frozen=True, order=True)
class Submodel:
    """One point of the submodel space: a width and a depth fraction in ``(0, 1]``.

    Raises:
        ValueError: for a fraction outside ``(0, 1]``.
    """

    width: float
    depth: float

    def __post_init__(self) -> None:
        for name in ("width", "depth"):
            value = float(getattr(self, name))
            if not 0.0 < value <= 1.0:
                raise ValueError(f"submodel {name} must be in (0, 1], got {value}.")
            object.__setattr__(self, name, value)

    @property
    def name(self) -> str:
        """``"w1/4-d1/6"``: human-readable, used in tables and plots."""
        return f"w{_fraction_text(self.width)}-d{_fraction_text(self.depth)}"

    @property
    def key(self) -> str:
        """``"w0.25_d0.1667"``: safe in metric names and file names."""
        return f"w{self.width:.4g}_d{self.depth:.4g}"

    @property
    def is_full(self) -> bool:
        """Width and depth 1: the original model."""
        return self.width == 1.0 and self.depth == 1.0


_Q, _H, _T = Fraction(1, 4), Fraction(1, 2), Fraction(3, 4)
TRIANGLE: tuple[Submodel, ...] = tuple(
    Submodel(float(w), float(d))
    for w, d in [(_Q, Fraction(1, 6)), (_Q, Fraction(1, 3)), (_Q, Fraction(2, 3)), (_Q, 1),
                 (_H, Fraction(1, 3)), (_H, Fraction(2, 3)), (_H, 1),
                 (_T, Fraction(2, 3)), (_T, 1), (1, 1)]
)  # fmt: skip
"""BST's submodel space: the 10 (width, depth) pairs where a wider submodel is at least as
deep (widths 1/4..1, depths 1/6..1 of 6 layers)."""


def parse_space(space: str | Iterable[Any]) -> list[Submodel]:
    """A submodel space from ``"triangle"`` or a list of ``[width, depth]`` pairs (numbers or
    strings such as ``"1/3"``), sorted from the smallest to the largest.

    Raises:
        ValueError: for an unknown name, a malformed pair, a fraction outside ``(0, 1]``,
            duplicates, or an empty space.
    """
    if isinstance(space, str):
        if space != "triangle":
            raise ValueError(f"unknown submodel space {space!r}; use 'triangle' or a list of "
                             "[width, depth] pairs, e.g. [[0.25, 1], [1, 1]].")  # fmt: skip
        return sorted(TRIANGLE)
    out = []
    for item in space:
        try:
            w, d = item
            out.append(Submodel(float(Fraction(str(w))), float(Fraction(str(d)))))
        except (TypeError, ValueError, ZeroDivisionError) as err:
            raise ValueError(
                f"submodel space entry {item!r}: expected [width, depth] with fractions in "
                f"(0, 1] such as [0.5, '1/3'] ({err})."
            ) from None
    if not out:
        raise ValueError("the submodel space is empty; give 'triangle' or [width, depth] pairs.")
    if len(set(out)) != len(out):
        raise ValueError(f"the submodel space has duplicates: {[s.name for s in out]}.")
    return sorted(out)


# ---------------------------------------------------------------------- sliced modules
def _check_in(module: nn.Module, n_in: int, full: int) -> None:
    if n_in > full:
        raise ValueError(
            f"{type(module).__name__} got {n_in} input features but has {full}; the stream "
            "feeding it is wider than the module (is a module that widens the stream missing "
            "from the anatomy's SlimSpec.region?)."
        )


class SlicedLinear(nn.Linear):
    """An ``nn.Linear`` that reads its first ``x.shape[-1]`` inputs and, when
    :attr:`slim_out` is set, computes only its first ``slim_out`` outputs (views, no copies)."""

    slim_out: int | None = None
    seen_in: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x[..., :n_in] @ W[:n_out, :n_in].T + b[:n_out]``."""
        n_in, n_out = x.shape[-1], self.slim_out
        self.seen_in = n_in
        if n_out is None and n_in == self.in_features:
            return F.linear(x, self.weight, self.bias)
        _check_in(self, n_in, self.in_features)
        n_out = self.out_features if n_out is None else n_out
        bias = None if self.bias is None else self.bias[:n_out]
        return F.linear(x, self.weight[:n_out, :n_in], bias)


class SlicedLayerNorm(nn.LayerNorm):
    """An ``nn.LayerNorm`` over the last ``x.shape[-1]`` features, with the first affine
    parameters."""

    seen_in: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise over the features ``x`` has."""
        n = x.shape[-1]
        self.seen_in = n
        if n == self.normalized_shape[0]:
            return super().forward(x)
        _check_in(self, n, self.normalized_shape[0])
        w = None if self.weight is None else self.weight[:n]
        b = None if self.bias is None else self.bias[:n]
        return F.layer_norm(x, (n,), w, b, self.eps)


class SlicedEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose vectors keep only their first :attr:`slim_out` entries."""

    slim_out: int | None = None
    seen_in: int | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Look up ``ids`` in the first ``slim_out`` columns of the table."""
        if self.slim_out is None:
            return super().forward(ids)
        return F.embedding(ids, self.weight[:, : self.slim_out], self.padding_idx)


_SLICED = {nn.Linear: SlicedLinear, nn.LayerNorm: SlicedLayerNorm, nn.Embedding: SlicedEmbedding}
_PLAIN = {v: k for k, v in _SLICED.items()}


@dataclass(frozen=True)
class _Rule:
    """How many outputs a module keeps at width ``w``."""

    size: int  # full size (units, or heads for kind == "heads")
    kind: str  # "units" | "heads"
    head_dim: int = 1

    def at(self, width: float) -> int | None:
        if width >= 1.0:
            return None
        return scaled(self.size, width) * self.head_dim


def _width_rules(model: nn.Module, anatomy: Anatomy, spec: SlimSpec) -> dict[str, _Rule]:
    """How many outputs each module of the width region keeps, by path.

    Raises:
        ValueError, TypeError: a region module that cannot be sliced (see :class:`Slimmable`).
    """
    modules = dict(model.named_modules())
    rules: dict[str, _Rule] = {}
    for a in anatomy.attentions:
        if not spec.in_region(a.q):
            continue
        if a.layout != "separate":
            raise ValueError(
                f"width slimming of {a.name}: its q/k/v projections are {a.layout} "
                "(one module); only separate q/k/v projections can be sliced by head. "
                "Leave the block out of SlimSpec.region."
            )
        for p in (a.q, a.k, a.v):
            rules[p] = _Rule(a.num_heads, "heads", a.head_dim)
    for f in anatomy.ffns:
        if spec.in_region(f.up):
            rules[f.up] = _Rule(f.inner_dim, "units")
    for path, m in modules.items():
        if path in rules or not spec.in_region(path):
            continue
        if type(m) in (nn.Linear, SlicedLinear):
            rules[path] = _Rule(m.out_features, "units")
        elif type(m) in (nn.Embedding, SlicedEmbedding):
            if m.max_norm is not None:
                raise ValueError(f"width slimming of {path}: an nn.Embedding with max_norm "
                                 "renormalises rows in place; slice it only without.")  # fmt: skip
            rules[path] = _Rule(m.embedding_dim, "units")
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            raise TypeError(
                f"width slimming of {path}: {type(m).__name__} subclasses "
                f"{'nn.Linear' if isinstance(m, nn.Linear) else 'nn.Embedding'}; its own "
                "forward would be replaced. Use the plain module or leave it out of "
                "SlimSpec.region."
            )
    for path in rules:
        if path not in modules:
            raise ValueError(f"width slimming: {path!r} is not a module of the model")
    return rules


def width_problems(model: nn.Module, anatomy: Anatomy | None = None) -> list[str]:
    """Why ``model`` cannot run at widths below 1 (empty: it can).

    Looks only at the structure, so it works on a model built on the meta device: a width
    region that is empty or holds modules that cannot be sliced, or a convolution writing the
    hidden stream (ViLT's and timm ViT's patch embeddings: their full-width outputs would meet
    the narrower stream). Depth slimming is unaffected.

    Args:
        model: the model.
        anatomy: its anatomy (default :func:`~vlcompress.models.anatomy.anatomy_of`).
    """
    anatomy = anatomy if anatomy is not None else anatomy_of(model)
    spec = anatomy.slim or _default_spec(anatomy)
    name = type(model).__name__
    depth_only = "slim it by depth only (widths of 1, e.g. the space [[1, '1/2'], [1, 1]])"
    try:
        rules = _width_rules(model, anatomy, spec)
    except (TypeError, ValueError) as e:
        return [str(e)]
    if not rules:
        return [
            f"{name}'s anatomy declares no width region (SlimSpec.region is empty), so nothing "
            "would get narrower; MCAN: set width_adapters: true (and flat_glimpses: 1); other "
            f"models: declare Anatomy.slim, or {depth_only}"
        ]
    hidden = {a.num_heads * a.head_dim for a in anatomy.attentions}
    convs = [  # a patch embedding: non-overlapping patches straight into the hidden size
        path
        for path, m in model.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd)
        and spec.in_region(path)
        and m.out_channels in hidden
        and tuple(m.kernel_size) == tuple(m.stride)
        and max(m.kernel_size) > 1
    ]
    if convs:
        return [
            f"{name} cannot be width-slimmed: the convolution {convs[0]} (a patch embedding) "
            "writes the hidden stream at full width, which the narrower stream then meets; "
            f"{depth_only}"
        ]
    return []


# ---------------------------------------------------------------------- the controller
class Slimmable:
    """Run-time width / depth slimming of ``model`` through its anatomy.

    Args:
        model: the model (its ``nn.Linear`` / ``nn.LayerNorm`` / ``nn.Embedding`` modules
            become their sliced subclasses until :meth:`detach`).
        anatomy: its anatomy (default: :func:`~vlcompress.models.anatomy.anatomy_of`).
        pad_outputs: zero-pad the model's outputs that a narrower submodel leaves narrower
            (a ``BertModel``'s ``last_hidden_state`` at width 1/2 has half the features) back
            to their full width, so code outside the model (a classifier head) works at every
            width. Padding with zeros is what reading the first features does: a linear head
            then computes exactly what its sliced copy computes on the narrow stream. An output
            counts as narrowed when its last dimension is a hidden size of the width region at
            full width and smaller now; the full sizes are learned from the first full-width
            forward (or one extra full-width forward without gradients). Outputs the model
            computes at a fixed size (logits of a head inside the model) are left alone.

    Raises:
        ValueError: for an anatomy whose width region holds fused or packed attention
            projections, or an ``nn.Embedding`` with ``max_norm`` in the region.
        TypeError: for a region module that is a subclass of ``nn.Linear`` / ``nn.Embedding``
            (its own forward would be bypassed).

    Example::

        slim = Slimmable(model)
        slim.set(Submodel(0.5, 1.0))
        ...
        slim.set(Submodel(1.0, 1.0))     # back to the full model
    """

    def __init__(
        self, model: nn.Module, anatomy: Anatomy | None = None, *, pad_outputs: bool = False
    ) -> None:
        self.model = model
        self.anatomy = anatomy if anatomy is not None else anatomy_of(model)
        self.spec = self.anatomy.slim or _default_spec(self.anatomy)
        self.rules: dict[str, _Rule] = _width_rules(model, self.anatomy, self.spec)
        self.pad_outputs = bool(pad_outputs)
        self.current = Submodel(1.0, 1.0)
        self.attached = False
        self._pad_hook: Any = None
        self._full_dims: dict[str, int] = {}  # output path -> last dimension at full width
        self._streams = {r.size for r in self.rules.values() if r.kind == "units"}
        self._width_problems: list[str] | None = None
        self.attach()

    def attach(self) -> None:
        """Make every plain ``nn.Linear`` / ``nn.LayerNorm`` / ``nn.Embedding`` sliceable
        (done by the constructor; after :meth:`detach`, again)."""
        if self.attached:
            return
        for m in self.model.modules():
            cls = _SLICED.get(type(m))
            if cls is SlicedLayerNorm and len(m.normalized_shape) != 1:
                continue  # normalises over several dimensions: not a width, left alone
            if cls is not None:
                m.__class__ = cls
        if self.pad_outputs:
            self._pad_hook = self.model.register_forward_hook(self._pad, with_kwargs=True)
        self.attached = True
        self.set(self.current)

    def detach(self) -> None:
        """Back to the full model and the plain module classes."""
        if not self.attached:
            return
        self.set(Submodel(1.0, 1.0))
        for m in self.model.modules():
            plain = _PLAIN.get(type(m))
            if plain is not None:
                m.__class__ = plain
                for attr in ("slim_out", "seen_in"):
                    m.__dict__.pop(attr, None)
        if self._pad_hook is not None:
            self._pad_hook.remove()
            self._pad_hook = None
        self.attached = False

    # ------------------------------------------------------------------ switching
    def layers_at(self, depth: float) -> dict[str, list[int]]:
        """Per stack, the indices of the layers kept at ``depth`` (index order)."""
        out = {}
        for stack, names in self.anatomy.stacks.items():
            k = scaled(len(names), depth)
            out[stack] = sorted(self.anatomy.depth_priority(stack)[:k])
        return out

    def set(self, submodel: Submodel) -> None:
        """Switch the model to ``submodel`` (cheap: sets a few hundred integers).

        Raises:
            ValueError: a width below 1 for a model that cannot be width-slimmed
                (:func:`width_problems`).
        """
        if not self.attached:
            raise RuntimeError("Slimmable.set after detach(); call attach() first.")
        if submodel.width < 1.0:
            if self._width_problems is None:
                self._width_problems = width_problems(self.model, self.anatomy)
            problems = self._width_problems
            if problems:
                raise ValueError(f"width {submodel.width}: " + "; ".join(problems))
        modules = dict(self.model.named_modules())
        for path, rule in self.rules.items():
            modules[path].slim_out = rule.at(submodel.width)
        for stack, kept in self.layers_at(submodel.depth).items():
            for i, name in enumerate(self.anatomy.stacks[stack]):
                if i in kept:
                    self.anatomy.unskip_layer(self.model, name)
                else:
                    self.anatomy.skip_layer(self.model, name)
        self.current = submodel

    @contextlib.contextmanager
    def submodel(self, width: float | Submodel, depth: float = 1.0) -> Iterator[Submodel]:
        """Run ``submodel`` inside the ``with`` block, then restore the previous one."""
        target = width if isinstance(width, Submodel) else Submodel(width, depth)
        previous = self.current
        self.set(target)
        try:
            yield target
        finally:
            self.set(previous)

    # ------------------------------------------------------------------ outputs
    def _pad(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Forward hook (``pad_outputs``): outputs of the hidden width that leave the model
        narrower than at full width come back zero-padded to it."""
        width = self.current.width
        if width >= 1.0:
            self._full_dims.update(_last_dims(output))
            return None
        if any(p not in self._full_dims for p in _last_dims(output)):
            self._record_full_dims(args, kwargs)
        return _padded(output, "", self._pad_to(width))

    def _pad_to(self, width: float) -> dict[str, tuple[int, int]]:
        """Output path -> (its width in a submodel of ``width``, its full width), for the
        outputs of the hidden width that the submodel narrows."""
        return {
            path: (scaled(n, width), n)
            for path, n in self._full_dims.items()
            if n in self._streams and scaled(n, width) < n
        }

    @torch.no_grad()
    def _record_full_dims(self, args: tuple, kwargs: dict) -> None:
        """Run the full model once (without the model's own hooks) to learn the full width of
        each output."""
        previous = self.current
        modes = {m: m.training for m in self.model.modules()}  # a frozen part may be in eval
        self.set(Submodel(1.0, previous.depth))
        self.model.eval()
        try:
            self._full_dims.update(_last_dims(self.model.forward(*args, **kwargs)))
        finally:
            for m, mode in modes.items():
                m.training = mode
            self.set(previous)

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def export(self, submodel: Submodel, *example: Any, **example_kwargs: Any) -> nn.Module:
        """A physically smaller, plain copy of ``submodel``: sliced weights copied into
        plain modules of the new sizes, skipped layers removed (a stack that is an
        ``nn.ModuleList`` is renumbered), head-count attributes and a Hugging Face
        ``config`` updated. The copy needs nothing from this module to run and computes what
        the slimmed model computes.

        Args:
            submodel: the submodel.
            example, example_kwargs: one input of the model: it is run once at ``submodel`` to
                see how many features reach every module.

        Returns:
            The copy (in the model's training mode; the model itself is unchanged).
        """
        with self.submodel(submodel):
            for m in self.model.modules():
                if isinstance(m, (SlicedLinear, SlicedLayerNorm)):
                    m.seen_in = None
            was = self.model.training
            self.model.eval()
            try:
                self.model(*example, **example_kwargs)
            finally:
                self.model.train(was)
            kept = self.layers_at(submodel.depth)
            copied = _copy_without_hooks(self.model)
        self._shrink(copied, submodel, kept)
        return copied

    def _shrink(self, copied: nn.Module, submodel: Submodel, kept: Mapping[str, list[int]]) -> None:
        from vlcompress.compress.structured import head_size_attributes, set_head_sizes

        made: dict[tuple[int, tuple[int, ...], int], nn.Parameter] = {}

        def param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
            # one new parameter per slice of one old parameter: tied weights stay tied
            key = (id(like), tuple(t.shape), t.storage_offset())
            if key not in made:
                made[key] = nn.Parameter(t.clone(), requires_grad=like.requires_grad)
            return made[key]

        for m in copied.modules():
            if isinstance(m, SlicedLinear):
                n_out = m.slim_out or m.out_features
                n_in = m.seen_in or m.in_features
                m.weight = param(m.weight[:n_out, :n_in], m.weight)
                if m.bias is not None:
                    m.bias = param(m.bias[:n_out], m.bias)
                m.in_features, m.out_features = n_in, n_out
            elif isinstance(m, SlicedEmbedding) and m.slim_out is not None:
                m.weight = param(m.weight[:, : m.slim_out], m.weight)
                m.embedding_dim = m.slim_out
            elif isinstance(m, SlicedLayerNorm) and m.seen_in is not None:
                n = m.seen_in
                m.normalized_shape = (n,)
                if m.weight is not None:
                    m.weight = param(m.weight[:n], m.weight)
                if m.bias is not None:
                    m.bias = param(m.bias[:n], m.bias)
            plain = _PLAIN.get(type(m))
            if plain is not None:
                m.__class__ = plain
                for attr in ("slim_out", "seen_in"):
                    m.__dict__.pop(attr, None)
        for path in self.spec.params:
            owner, _, name = path.rpartition(".")
            mod = copied.get_submodule(owner) if owner else copied
            p = getattr(mod, name)
            setattr(mod, name, param(p[..., : scaled(p.shape[-1], submodel.width)], p))
        for a in self.anatomy.attentions:
            if a.q not in self.rules:
                continue
            attrs = head_size_attributes(copied, a, a.name, required=False)
            set_head_sizes(attrs, scaled(a.num_heads, submodel.width), a.head_dim)
        for stack, names in self.anatomy.stacks.items():
            keep = kept[stack]
            for name in names:
                copied.get_submodule(name).__dict__.pop("forward", None)
            parent_name = names[0].rpartition(".")[0]
            parent = copied.get_submodule(parent_name) if parent_name else copied
            numbered = [f"{parent_name}.{i}" if parent_name else str(i) for i in range(len(names))]
            if (
                isinstance(parent, nn.ModuleList)
                and names == numbered
                and len(parent) == len(names)
            ):
                grand, _, attr = parent_name.rpartition(".")
                owner = copied.get_submodule(grand) if grand else copied
                setattr(owner, attr, nn.ModuleList(parent[i] for i in keep))
            else:
                for i, name in enumerate(names):
                    if i not in keep:
                        self.anatomy.bypass_layer(copied, name)
        _update_hf_config(copied, self.anatomy, submodel, kept)
        counts = {len(v) for v in kept.values()}
        options = getattr(copied, "slimmed_options", None)
        current = options_of(copied)
        if options is not None and len(counts) == 1 and current is not None:
            new = options(submodel.width, next(iter(counts)))
            copied.options = dataclasses.replace(current, **new)


_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _copy_without_hooks(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` without any module hooks: a hook bound to a callback would
    otherwise copy the callback and all it holds (trainer, data, teacher)."""
    saved = []
    for m in model.modules():
        hooks = {name: m.__dict__[name] for name in _HOOKS if name in m.__dict__}
        saved.append((m, hooks))
        for name, d in hooks.items():
            m.__dict__[name] = type(d)()
    try:
        return copy.deepcopy(model)
    finally:
        for m, hooks in saved:
            m.__dict__.update(hooks)


def _default_spec(anatomy: Anatomy) -> SlimSpec:
    """The width region of an anatomy without a :class:`SlimSpec`: its layers and the extra
    modules of every modality (embeddings, input projections, pooler)."""
    region = [x.name for x in anatomy.layers]
    for paths in anatomy.extra_modules.values():
        region += paths
    return SlimSpec(region=tuple(region))


def _update_hf_config(
    copied: nn.Module, anatomy: Anatomy, submodel: Submodel, kept: Mapping[str, list[int]]
) -> None:
    """Update a Hugging Face ``config`` (hidden size, heads, FFN size, layer count) of every
    module that has one, so that code reading it agrees with the shrunk modules."""
    heads = {a.num_heads for a in anatomy.attentions}
    inner = {f.inner_dim for f in anatomy.ffns}
    layers = {len(v) for v in kept.values()}
    seen: set[int] = set()
    for m in copied.modules():
        cfg = getattr(m, "config", None)
        hf = type(cfg).__module__.startswith("transformers.")
        if cfg is None or not hf or id(cfg) in seen or not hasattr(cfg, "hidden_size"):
            continue
        seen.add(id(cfg))
        cfg.hidden_size = scaled(cfg.hidden_size, submodel.width)
        if getattr(cfg, "num_attention_heads", None) in heads:
            cfg.num_attention_heads = scaled(cfg.num_attention_heads, submodel.width)
        if getattr(cfg, "intermediate_size", None) in inner:
            cfg.intermediate_size = scaled(cfg.intermediate_size, submodel.width)
        if hasattr(cfg, "num_hidden_layers") and len(layers) == 1:
            cfg.num_hidden_layers = next(iter(layers))


def _last_dims(output: Any, path: str = "") -> dict[str, int]:
    """``{path: last dimension}`` of the floating-point tensors with at least 2 dimensions in a
    model output (tensors, tuples, lists, dicts, dataclasses such as a ``ModelOutput``)."""
    if isinstance(output, torch.Tensor):
        ok = output.is_floating_point() and output.dim() >= 2
        return {path: int(output.shape[-1])} if ok else {}
    out: dict[str, int] = {}
    if isinstance(output, Mapping):
        for k, v in output.items():
            out.update(_last_dims(v, f"{path}.{k}"))
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        for f in dataclasses.fields(output):
            out.update(_last_dims(getattr(output, f.name), f"{path}.{f.name}"))
    elif isinstance(output, (tuple, list)):
        for i, v in enumerate(output):
            out.update(_last_dims(v, f"{path}[{i}]"))
    return out


def _padded(output: Any, path: str, pad_to: Mapping[str, tuple[int, int]]) -> Any:
    """``output`` with the tensor at each path of ``pad_to`` (``(narrow, full)``) zero-padded
    in its last dimension from ``narrow`` to ``full`` (a tensor of another size, e.g. one
    whose last dimension is a sequence length, is left alone; containers rebuilt, everything
    else unchanged)."""
    if not pad_to:
        return output
    if isinstance(output, torch.Tensor):
        narrow, full = pad_to.get(path, (-1, -1))
        if output.shape[-1] != narrow:
            return output
        return F.pad(output, (0, full - narrow))
    if isinstance(output, Mapping):
        items = {k: _padded(v, f"{path}.{k}", pad_to) for k, v in output.items()}
        if dataclasses.is_dataclass(output):  # a transformers ModelOutput
            return type(output)(**items)
        return type(output)(items) if isinstance(output, dict) else items
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return dataclasses.replace(
            output,
            **{
                f.name: _padded(getattr(output, f.name), f"{path}.{f.name}", pad_to)
                for f in dataclasses.fields(output)
                if f.init
            },
        )
    if isinstance(output, (tuple, list)):
        items = [_padded(v, f"{path}[{i}]", pad_to) for i, v in enumerate(output)]
        if hasattr(output, "_fields"):  # a namedtuple
            return type(output)(*items)
        return type(output)(items)
    return output
