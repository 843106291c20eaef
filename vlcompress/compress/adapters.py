"""Bottleneck adapters and where they sit in a layer (seed 002, DAS), through the anatomy.

:class:`BottleneckAdapter` is ``LayerNorm -> Linear(D -> b) -> ReLU -> Linear(b -> D)``.
*Parallel* adapters sit beside a layer's sublayers and add their output to the residual
stream (:func:`add_parallel_adapters`); a *skip* adapter stands in for a whole skipped layer
(``x + adapter(x)``, see :meth:`~vlcompress.models.anatomy.Anatomy.bypass_layer`).

Positions follow the seed (``../shared/ANCHORS.md``), read off each block's modules:

* an attention block whose output module is BERT's ``output(hidden_states, input_tensor)``
  with a LayerNorm (post-norm: BERT, UNITER, LXMERT, METER's fusion layers) gets the adapter
  *inside* that LayerNorm: ``LN(dense(attn) + h + A(h))``;
* a feed-forward block whose down-projection sits in such an ``output(hidden_states,
  input_tensor)`` module gets it *after* the module: ``LN(FFN(h) + h) + A(h)`` for post-norm,
  ``x + MLP(LN x) + A(x)`` for pre-norm ViLT (whose ``output`` adds the residual itself);
* any other attention block adds ``A(x)`` to its output, where ``x`` is the layer's input
  stream for the layer's first attention (so a pre-norm block such as ViLT's reads the
  un-normalised input: ``x + Attn(LN x) + A(x)``) and the block's query input otherwise; any
  other feed-forward block adds ``A(x)`` to its down-projection's output, ``x`` being its
  up-projection's input (MCAN; CLIP-style blocks, whose ``x`` is normalised).

A block called more than once per forward (LXMERT's shared bidirectional cross-attention) uses
its one adapter on every call. The adapters are not added to the model (its ``parameters()`` and ``state_dict`` keep their
keys): whoever adds them owns them, as a callback's ``own_module`` does.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from vlcompress.models.anatomy import Anatomy

__all__ = [
    "AdapterSet",
    "AdapterSite",
    "BottleneckAdapter",
    "adapter_sites",
    "add_parallel_adapters",
    "block_width",
    "install_adapters",
    "key_of",
]

AdapterInit = Literal["seed", "zero"]


class BottleneckAdapter(nn.Module):
    """``scale * up(relu(down(LayerNorm(x))))`` (plus ``x`` with ``residual``).

    Args:
        dim: width of the stream.
        bottleneck: units of the bottleneck (the seed: 96 parallel, 192 / 288 for a skipped
            ViLT layer / METER half).
        init: ``"seed"``: both projections N(0, 0.02), zero biases (as DAS; the adapted model
            does not start as the backbone); ``"zero"``: the up-projection is zero, so the
            adapter adds nothing until it trains.
        scale: factor on the adapter's output (1.0 in the seed).
        residual: return ``x + adapter(x)`` (a skip adapter standing in for a layer) instead of
            the adapter's output alone (a parallel adapter).

    Raises:
        ValueError: for a non-positive size or an unknown ``init``.
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int = 96,
        init: AdapterInit = "seed",
        scale: float = 1.0,
        residual: bool = False,
    ) -> None:
        super().__init__()
        if dim < 1 or bottleneck < 1:
            raise ValueError(f"adapter sizes must be positive, got dim={dim}, b={bottleneck}.")
        if init not in ("seed", "zero"):
            raise ValueError(f"adapter init must be 'seed' or 'zero', got {init!r}.")
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.scale, self.residual = scale, residual
        for lin in (self.down, self.up):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        if init == "zero":
            nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's output (``x`` added with ``residual``)."""
        out = self.up(torch.relu(self.down(self.norm(x)))) * self.scale
        return x + out if self.residual else out

    def extra_repr(self) -> str:
        """Scale and residual flag."""
        return f"scale={self.scale}, residual={self.residual}"


# ---------------------------------------------------------------------- sites
@dataclass(frozen=True)
class AdapterSite:
    """Where one parallel adapter goes.

    Attributes:
        name: the attention or feed-forward block's name in the anatomy (the adapter's key).
        layer: the layer it belongs to.
        how: ``"inside_norm"`` (BERT-style attention output: added to its residual input),
            ``"after_output"`` (BERT-style FFN output: ``out + A(input_tensor)``),
            ``"layer_input"`` (attention: ``out + A(layer's input stream)``), ``"own_input"``
            (attention: ``out + A(the module's first input)``) or ``"ffn_input"`` (the
            down-projection's output ``+ A(the up-projection's input)``).
        module: path of the module whose output the adapter's output joins.
        source: with ``"ffn_input"``, the module whose input the adapter reads.
    """

    name: str
    layer: str
    how: str
    module: str
    source: str | None = None


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _is_bert_output(module: nn.Module | None, with_norm: bool) -> bool:
    """``forward(hidden_states, input_tensor)`` (BERT's ``*Output`` modules)."""
    if module is None:
        return False
    try:
        names = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return False
    if names[:2] != ["hidden_states", "input_tensor"]:
        return False
    has_norm = any(isinstance(m, nn.LayerNorm) for m in module.children())
    return has_norm or not with_norm


def adapter_sites(
    model: nn.Module, anatomy: Anatomy, layers: Iterable[str] | None = None
) -> list[AdapterSite]:
    """Where the parallel adapters of ``layers`` (default: every declared layer) go: one per
    attention block and one per feed-forward block, in the anatomy's order.

    Raises:
        KeyError: for an undeclared layer.
    """
    modules = dict(model.named_modules())
    wanted = [anatomy.layer(n) for n in layers] if layers is not None else list(anatomy.layers)
    sites: list[AdapterSite] = []
    for spec in wanted:
        for i, name in enumerate(spec.attentions):
            a = anatomy.attention(name)
            out_parent = _parent(a.out)
            if _is_bert_output(modules.get(out_parent), with_norm=True):
                sites.append(AdapterSite(name, spec.name, "inside_norm", out_parent))
            else:
                how = "layer_input" if i == 0 and len(spec.streams) == 1 else "own_input"
                sites.append(AdapterSite(name, spec.name, how, name))
        for name in spec.ffns:
            f = anatomy.ffn(name)
            down_parent = _parent(f.down)
            if _is_bert_output(modules.get(down_parent), with_norm=False):
                sites.append(AdapterSite(name, spec.name, "after_output", down_parent))
            else:  # read the up-projection's input, add to the down-projection's output
                sites.append(AdapterSite(name, spec.name, "ffn_input", f.down, source=f.up))
    return sites


# ---------------------------------------------------------------------- hooks
def _add_to_first(output: Any, extra: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (output[0] + extra, *output[1:])
    if isinstance(output, list):
        return [output[0] + extra, *output[1:]]
    return output + extra


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> tuple[Any, bool]:
    if len(args) > index:
        return args[index], True
    return kwargs[name], False


def _follow(adapter: nn.Module, like: torch.Tensor) -> None:
    first = next(adapter.parameters(), None)
    if first is not None and first.device != like.device:
        adapter.to(like.device)


@dataclass
class AdapterSet:
    """Parallel adapters hooked into a model (:func:`add_parallel_adapters`).

    Attributes:
        adapters: one adapter per site, keyed by the block's name with ``.`` written ``/``
            (``nn.ModuleDict`` keys cannot hold dots).
        sites: where each adapter sits.
    """

    adapters: nn.ModuleDict
    sites: list[AdapterSite]
    handles: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        """Detach every adapter: the model computes exactly what it did before. Idempotent."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


def key_of(name: str) -> str:
    """The ``nn.ModuleDict`` key of the adapter of block ``name``."""
    return name.replace(".", "/")


def add_parallel_adapters(
    model: nn.Module,
    anatomy: Anatomy,
    bottleneck: int = 96,
    init: AdapterInit = "seed",
    scale: float = 1.0,
    layers: Iterable[str] | None = None,
    adapters: nn.ModuleDict | None = None,
) -> AdapterSet:
    """Hook a parallel :class:`BottleneckAdapter` beside every attention and feed-forward
    block of ``layers`` (default: all), at the seed's positions (see the module docstring).

    Args:
        model: the model (not changed: no parameter or buffer is added).
        anatomy: its anatomy.
        bottleneck, init, scale: of each new adapter.
        layers: the layers to adapt.
        adapters: existing adapters to hook (e.g. an owned module restored from a checkpoint);
            missing ones are created.

    Returns:
        The adapters, their sites and the hook handles (``.remove()`` detaches them all).

    Example::

        added = add_parallel_adapters(model, anatomy_of(model), bottleneck=96)
        optimizer = torch.optim.AdamW(added.adapters.parameters(), lr=1e-3)
        ...
        added.remove()
    """
    sites = adapter_sites(model, anatomy, layers)
    modules = dict(model.named_modules())
    adapters = adapters if adapters is not None else nn.ModuleDict()
    out = AdapterSet(adapters, sites)
    layer_inputs: dict[str, torch.Tensor] = {}
    grabbed: set[str] = set()
    for site in sites:
        spec = anatomy.layer(site.layer)
        dim = block_width(anatomy, modules, site.name)
        key = key_of(site.name)
        if key not in adapters:
            adapters[key] = BottleneckAdapter(dim, bottleneck, init, scale)
        adapter = adapters[key]
        target = modules[site.module]
        if site.how == "inside_norm":

            def pre(_m, args, kwargs, a=adapter):
                h, positional = _arg(args, kwargs, 1, "input_tensor")
                _follow(a, h)
                h = h + a(h)
                if positional:
                    return (args[0], h, *args[2:]), kwargs
                return args, {**kwargs, "input_tensor": h}

            out.handles.append(target.register_forward_pre_hook(pre, with_kwargs=True))
        elif site.how == "after_output":

            def post(_m, args, kwargs, output, a=adapter):
                h, _ = _arg(args, kwargs, 1, "input_tensor")
                _follow(a, h)
                return output + a(h)

            out.handles.append(target.register_forward_hook(post, with_kwargs=True))
        elif site.how == "ffn_input":
            seen: dict[str, torch.Tensor] = {}

            def read(_m, args, seen=seen):
                seen["x"] = args[0]

            def join(_m, _args, output, a=adapter, seen=seen):
                x = seen.pop("x")
                _follow(a, x)
                return output + a(x)

            out.handles.append(modules[site.source].register_forward_pre_hook(read))
            out.handles.append(target.register_forward_hook(join))
        else:
            if site.how == "layer_input" and site.layer not in grabbed:
                layer = modules[site.layer]
                ref = spec.streams[0]
                names = list(inspect.signature(layer.forward).parameters)

                def grab(_m, args, kwargs, layer_name=site.layer, ref=ref, names=names):
                    if isinstance(ref, int):
                        x = args[ref] if ref < len(args) else kwargs[names[ref]]
                    else:
                        i = names.index(ref) if ref in names else len(args)
                        x = args[i] if i < len(args) else kwargs[ref]
                    layer_inputs[layer_name] = x

                def release(_m, _a, _out, layer_name=site.layer):
                    layer_inputs.pop(layer_name, None)  # hold no activation between calls

                out.handles.append(layer.register_forward_pre_hook(grab, with_kwargs=True))
                out.handles.append(layer.register_forward_hook(release))
                grabbed.add(site.layer)

            def beside(_m, args, kwargs, output, a=adapter, site=site):
                x = layer_inputs.get(site.layer) if site.how == "layer_input" else None
                if x is None:  # the block's own (query) input, or a call outside its layer
                    x = args[0] if args else next(iter(kwargs.values()))
                _follow(a, x)
                return _add_to_first(output, a(x))

            out.handles.append(target.register_forward_hook(beside, with_kwargs=True))
    return out


def block_width(anatomy: Anatomy, modules: dict[str, nn.Module], name: str) -> int:
    """Width of the stream a block reads and writes: its output projection's output size."""
    try:
        path = anatomy.attention(name).out
    except KeyError:
        path = anatomy.ffn(name).down
    mod = modules[path]
    width = getattr(mod, "out_features", None) or getattr(mod, "embed_dim", None)
    if not width:
        raise ValueError(f"cannot read the stream width of {name!r} from {path!r}.")
    return int(width)


# ---------------------------------------------------------------------- a standalone model
INSTALLED = "vlcompress_adapters"
"""Attribute under which :func:`install_adapters` registers the parallel adapters on a model."""


def install_adapters(
    model: nn.Module,
    anatomy: Anatomy,
    spec: dict[str, Any],
    weights: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Make an adapted, skipped model standalone: the parallel adapters become a submodule of
    ``model`` (``model.vlcompress_adapters``, hooked as :func:`add_parallel_adapters` does) and
    each skipped layer is *removed* for good, a bypass holding its skip adapter in its place
    (:meth:`~vlcompress.models.anatomy.Anatomy.bypass_layer`). The model's ``state_dict`` then
    holds every adapter, and the skipped layers' parameters are gone: the model is smaller and
    faster, and loads without the callback that trained it (rebuild, install, load weights).

    Args:
        model: the model (changed in place).
        anatomy: its anatomy (of the model before skipping).
        spec: ``{"bottleneck": b (0: no parallel adapters), "skipped": {layer: b_skip}}``
            (what ``ArchitectureSkipping`` records in ``results.json``).
        weights: optional adapter weights in the callback's owned layout (``parallel.<key>.*``
            and ``skip_adapters.<key>.*``, ``<key>`` as :func:`key_of`).

    Returns:
        ``model``.

    Raises:
        KeyError: for an undeclared layer, or missing adapter weights.
    """
    weights = weights or {}

    def take(prefix: str, module: nn.Module) -> None:
        found = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        if weights and not found:
            raise KeyError(f"no adapter weights under {prefix!r}")
        if found:
            module.load_state_dict(found)

    b = int(spec.get("bottleneck", 0))
    modules = dict(model.named_modules())
    skipped = dict(spec.get("skipped", {}))
    if b:
        parallel = nn.ModuleDict()
        kept = [x.name for x in anatomy.layers if x.name not in skipped]
        add_parallel_adapters(model, anatomy, b, "zero", layers=kept, adapters=parallel)
        for key, adapter in parallel.items():
            take(f"parallel.{key}.", adapter)
        model.add_module(INSTALLED, parallel)
    for name, bottleneck in skipped.items():
        layer_spec = anatomy.layer(name)
        width = block_width(anatomy, modules, (layer_spec.attentions or layer_spec.ffns)[0])
        adapters = [
            BottleneckAdapter(width, int(bottleneck), residual=True) for _ in layer_spec.streams
        ]
        if len(adapters) == 1:
            take(f"skip_adapters.{key_of(name)}.", adapters[0])
        else:
            for i, a in enumerate(adapters):
                take(f"skip_adapters.{key_of(name)}.{i}.", a)
        anatomy.bypass_layer(model, name, adapters if len(adapters) > 1 else adapters[0])
    return model
