"""The :class:`Anatomy`: a model's declared structure, and every operation callbacks need."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from vlcompress.models.anatomy.bypass import (
    LayerBypass,
    SkipForward,
    _get_streams,
    _positional_names,
    output_template,
)
from vlcompress.models.anatomy.coverage import CoverageReport, coverage_of
from vlcompress.models.anatomy.masks import MaskHandle, add_head_mask, add_unit_mask, head_weights
from vlcompress.models.anatomy.specs import (
    AttentionSpec,
    FFNSpec,
    LayerSpec,
    Modality,
    OutputTemplate,
    SlimSpec,
    default_depth_priority,
)

__all__ = ["Anatomy", "prunable_weights_in"]

log = logging.getLogger(__name__)

_NOT_PRUNED = ("position", "token_type", "pos_embed", "type_embed", "cls_token", "reg_token")


def prunable_weights_in(module: nn.Module, prefix: str = "") -> list[str]:
    """Names of the weight matrices in ``module`` that pruning may mask.

    ``nn.Linear`` (and subclasses) and convolution weights, ``nn.MultiheadAttention`` input
    projections, Hugging Face ``Conv1D`` weights and word embeddings; never biases, norms, or
    position / token-type embeddings.

    Args:
        module: where to look.
        prefix: prepended (with a dot) to every name.

    Returns:
        Parameter names, in module order.
    """
    names = []
    lead = f"{prefix}." if prefix else ""
    for sub_name, sub in module.named_modules():
        here = f"{lead}{sub_name}." if sub_name else lead
        if isinstance(sub, (nn.Linear, nn.modules.conv._ConvNd)) or type(sub).__name__ == "Conv1D":
            names.append(f"{here}weight")
        elif isinstance(sub, nn.MultiheadAttention):
            for p in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if sub._parameters.get(p) is not None:
                    names.append(f"{here}{p}")
        elif isinstance(sub, nn.Embedding) and not any(k in f"{here}" for k in _NOT_PRUNED):
            names.append(f"{here}weight")
    return names


def _find(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


_Spec = TypeVar("_Spec", AttentionSpec, FFNSpec, LayerSpec)


def _named(specs: Sequence[_Spec], name: str, what: str) -> _Spec:
    """The spec called ``name`` in ``specs``; ``KeyError`` listing the known names if none."""
    for spec in specs:
        if spec.name == name:
            return spec
    raise KeyError(f"no {what} {name!r}; known: {[s.name for s in specs]}")


def _pick(output: Any, index: int | None) -> Any:
    if isinstance(output, (tuple, list)):
        return output[index or 0]
    if index:
        raise IndexError(f"read-out asks for item {index} of an output that is not a tuple")
    return output


def _put(output: Any, index: int | None, value: Any) -> Any:
    """``output`` with the item :func:`_pick` reads replaced by ``value``."""
    if isinstance(output, (tuple, list)):
        items = list(output)
        items[index or 0] = value
        return type(output)(items) if isinstance(output, list) else tuple(items)
    if index:
        raise IndexError(f"read-out asks for item {index} of an output that is not a tuple")
    return value


@dataclass
class Anatomy:
    """A model's declared structure: layers, attention and FFN blocks, modalities, read-outs.

    Callbacks work only through this declaration (never through a concrete model class):

    * pruning — :meth:`prunable_weights` (weights per modality), :meth:`mask_heads` (whole
      heads), :meth:`mask_ffn_units` (FFN neurons), :meth:`head_weights` (where a head lives);
    * slimming — the same masks (width), :attr:`stacks` with :meth:`replace_layer` (depth);
    * skipping — :meth:`bypass_layer` (a :class:`LayerBypass`, optionally with adapters);
    * distillation — :meth:`capture` reads hidden states at the declared read-out points.

    Attributes:
        layers: every transformer layer.
        attentions: every attention block.
        ffns: every feed-forward block.
        stacks: ordered layer paths per stack, in the order the model runs them.
        readouts: name -> module path whose output is a hidden state; ``"path#i"`` reads item
            ``i`` of a tuple output (the default is item 0, or the output itself).
        extra_weights: per modality, parameter names outside the layers that pruning may mask
            (word embeddings, input projections, pooler).
        extra_modules: per modality, module (or parameter) paths outside the layers that
            belong to it (embeddings, input projections, norms, pooler): they count as
            declared in :meth:`coverage` but are not pruned unless also in ``extra_weights``.
        head_modules: module paths of the task head (never pruned by default).
        slim: where the hidden width lives and the depth order of each stack, for width and
            depth slimming (``None``: the layers and :attr:`extra_modules` are the width
            region, the stacks keep :func:`default_depth_priority`).

    Example::

        anatomy = anatomy_of(model)
        handles = anatomy.mask_heads(model, {"encoder.layer.0.attention": torch.tensor([1., 0.])})
        anatomy.bypass_layer(model, "encoder.layer.5")
    """

    layers: list[LayerSpec] = field(default_factory=list)
    attentions: list[AttentionSpec] = field(default_factory=list)
    ffns: list[FFNSpec] = field(default_factory=list)
    stacks: dict[str, list[str]] = field(default_factory=dict)
    readouts: dict[str, str] = field(default_factory=dict)
    extra_weights: dict[Modality, list[str]] = field(default_factory=dict)
    extra_modules: dict[Modality, list[str]] = field(default_factory=dict)
    head_modules: list[str] = field(default_factory=list)
    slim: SlimSpec | None = None
    learned_outputs: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """Output templates of skipped layers learned on their first skipped call (layers without a
    declared :attr:`LayerSpec.output`), kept so that skipping again costs nothing."""

    # ------------------------------------------------------------ building
    def add_layer(self, spec: LayerSpec, readout: bool = True) -> LayerSpec:
        """Append ``spec`` to :attr:`layers` and its stack (and a read-out of its output).

        Args:
            spec: the layer.
            readout: also declare read-outs: ``spec.name`` (the first stream) and, for
                multi-stream layers, ``"<name>.<side>"`` per stream.

        Returns:
            ``spec``.
        """
        self.layers.append(spec)
        self.stacks.setdefault(spec.stack, []).append(spec.name)
        if readout:
            self.readouts[spec.name] = spec.name
            if spec.num_streams > 1:
                for i, side in enumerate(spec.stream_sides):
                    self.readouts[f"{spec.name}.{side.value}"] = f"{spec.name}#{i}"
        return spec

    def prefixed(self, prefix: str) -> Anatomy:
        """The same anatomy for a model that holds this one's model at ``prefix``.

        Args:
            prefix: module path of the inner model (e.g. ``"lxmert"``); ``""`` = a copy.

        Returns:
            A new anatomy whose every path starts with ``prefix.``.
        """

        def p(path: str) -> str:
            return f"{prefix}.{path}" if prefix and path else prefix or path

        def attn(a: AttentionSpec) -> AttentionSpec:
            return dataclasses.replace(
                a, name=p(a.name), q=p(a.q), k=p(a.k), v=p(a.v), out=p(a.out)
            )

        def ffn(f: FFNSpec) -> FFNSpec:
            return dataclasses.replace(f, name=p(f.name), up=p(f.up), down=p(f.down))

        def layer(x: LayerSpec) -> LayerSpec:
            return dataclasses.replace(
                x, name=p(x.name), stack=p(x.stack), attentions=tuple(map(p, x.attentions)),
                ffns=tuple(map(p, x.ffns)),
            )  # fmt: skip

        return Anatomy(
            layers=[layer(x) for x in self.layers],
            attentions=[attn(a) for a in self.attentions],
            ffns=[ffn(f) for f in self.ffns],
            stacks={p(s): [p(n) for n in names] for s, names in self.stacks.items()},
            readouts={p(k): p(v) for k, v in self.readouts.items()},
            extra_weights={m: [p(n) for n in ns] for m, ns in self.extra_weights.items()},
            extra_modules={m: [p(n) for n in ns] for m, ns in self.extra_modules.items()},
            head_modules=[p(n) for n in self.head_modules],
            slim=self.slim.prefixed(prefix) if self.slim is not None else None,
        )

    def merge(self, other: Anatomy) -> Anatomy:
        """Add ``other``'s declarations to this anatomy (for models made of several parts).

        Args:
            other: an anatomy of another part of the same model (paths from the same root).

        Returns:
            ``self``.

        Raises:
            ValueError: when both declare the same layer.
        """
        clash = {x.name for x in self.layers} & {x.name for x in other.layers}
        if clash:
            raise ValueError(f"both anatomies declare the layers {sorted(clash)}")
        self.layers += other.layers
        self.attentions += other.attentions
        self.ffns += other.ffns
        for s, names in other.stacks.items():
            self.stacks.setdefault(s, []).extend(names)
        self.readouts.update(other.readouts)
        for target, source in ((self.extra_weights, other.extra_weights),
                               (self.extra_modules, other.extra_modules)):  # fmt: skip
            for m, names in source.items():
                target.setdefault(m, []).extend(n for n in names if n not in target.get(m, []))
        self.head_modules += [h for h in other.head_modules if h not in self.head_modules]
        if other.slim is not None:
            mine = self.slim
            self.slim = other.slim if mine is None else SlimSpec(
                mine.region + other.slim.region, mine.fixed + other.slim.fixed,
                mine.params + other.slim.params,
                {**mine.depth_priority, **other.slim.depth_priority},
            )  # fmt: skip
        return self

    # ------------------------------------------------------------ look-ups
    def attention(self, name: str) -> AttentionSpec:
        """The attention block called ``name``.

        Raises:
            KeyError: for an unknown name (the known ones are listed).
        """
        return _named(self.attentions, name, "attention block")

    def ffn(self, name: str) -> FFNSpec:
        """The feed-forward block called ``name``.

        Raises:
            KeyError: for an unknown name (the known ones are listed).
        """
        return _named(self.ffns, name, "FFN block")

    def layer(self, name: str) -> LayerSpec:
        """The layer called ``name``.

        Raises:
            KeyError: for an unknown name (the known ones are listed).
        """
        return _named(self.layers, name, "layer")

    def layer_of(self, path: str) -> LayerSpec | None:
        """The layer containing module ``path`` (``None`` if it is outside every layer)."""
        best = None
        for x in self.layers:
            if (path == x.name or path.startswith(x.name + ".")) and (
                best is None or len(x.name) > len(best.name)
            ):
                best = x
        return best

    def bypassed(self, model: nn.Module) -> list[str]:
        """The declared layers that are bypassed (a :class:`LayerBypass`) in ``model`` now."""
        return [x.name for x in self.layers if isinstance(_find(model, x.name), LayerBypass)]

    def _check_live(self, model: nn.Module, path: str, what: str) -> None:
        owner = self.layer_of(path)
        if owner is not None and isinstance(_find(model, owner.name), LayerBypass):
            raise ValueError(
                f"{what} is inside layer {owner.name!r}, which is bypassed; restore the layer "
                "(anatomy.replace_layer(model, name, original)) before masking it."
            )

    @property
    def modalities(self) -> list[Modality]:
        """The modalities of the declared layers, in :class:`Modality` order."""
        found = {x.modality for x in self.layers}
        return [m for m in Modality if m in found]

    # ------------------------------------------------------------ checks
    def validate(self, model: nn.Module) -> None:
        """Check that every declared path exists and that sizes agree with the modules.

        Args:
            model: the model this anatomy describes.

        Raises:
            ValueError: naming every missing path and inconsistent size at once.
        """
        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        problems: list[str] = []
        bypassed = tuple(f"{n}." for n in self.bypassed(model))

        def need(path: str, what: str) -> nn.Module | None:
            if path.startswith(bypassed):
                return None  # inside a bypassed layer: gone until the layer is restored
            if path not in modules:
                problems.append(f"{what} {path!r} is not a module of the model")
                return None
            return modules[path]

        for a in self.attentions:
            need(a.name, "attention block")
            if a.layout == "separate":
                for role in ("q", "k", "v"):
                    m = need(getattr(a, role), f"{role} projection of {a.name}")
                    if isinstance(m, nn.Linear) and m.out_features != a.width:
                        problems.append(
                            f"{a.name}: {role} projection has {m.out_features} outputs, not "
                            f"num_heads x head_dim = {a.width}"
                        )
            elif a.layout == "fused":
                m = need(a.v, f"fused qkv projection of {a.name}")
                if isinstance(m, nn.Linear) and m.out_features != 3 * a.width:
                    problems.append(
                        f"{a.name}: fused projection has {m.out_features} outputs, not "
                        f"3 x {a.width}"
                    )
            else:
                m = need(a.v, f"packed attention module of {a.name}")
                if m is not None and not hasattr(m, "embed_dim"):
                    problems.append(f"{a.name}: layout 'packed' needs an nn.MultiheadAttention")
                elif m is not None and m.embed_dim != a.width:
                    problems.append(f"{a.name}: embed_dim {m.embed_dim} != {a.width}")
            out = need(a.out, f"output projection of {a.name}")
            if isinstance(out, nn.Linear) and out.in_features != a.width:
                problems.append(
                    f"{a.name}: output projection takes {out.in_features} features, not "
                    f"num_heads x head_dim = {a.num_heads}x{a.head_dim}"
                )
        for f in self.ffns:
            up, down = need(f.up, f"up projection of {f.name}"), need(f.down, f"down of {f.name}")
            if isinstance(up, nn.Linear) and up.out_features != f.inner_dim:
                problems.append(f"{f.name}: up has {up.out_features} outputs, not {f.inner_dim}")
            if isinstance(down, nn.Linear) and down.in_features != f.inner_dim:
                problems.append(f"{f.name}: down takes {down.in_features}, not {f.inner_dim}")
        attention_names = {a.name for a in self.attentions}
        ffn_names = {f.name for f in self.ffns}
        for x in self.layers:
            layer = need(x.name, "layer")
            problems += [f"layer {x.name}: unknown attention {a!r}" for a in x.attentions
                         if a not in attention_names]  # fmt: skip
            problems += [f"layer {x.name}: unknown FFN {f!r}" for f in x.ffns if f not in ffn_names]
            if layer is not None and not isinstance(layer, LayerBypass):
                names = _positional_names(layer.forward)
                for ref in x.streams:
                    if isinstance(ref, str) and names and ref not in names:
                        problems.append(
                            f"layer {x.name}: stream {ref!r} is not a parameter of "
                            f"{type(layer).__name__}.forward {names}"
                        )
        layer_names = {x.name for x in self.layers}
        for stack, names in self.stacks.items():
            problems += [f"stack {stack!r}: {n!r} is not a declared layer" for n in names
                         if n not in layer_names]  # fmt: skip
        for key, path in self.readouts.items():
            need(path.partition("#")[0], f"read-out {key!r}")
        for names in self.extra_weights.values():
            problems += [f"extra weight {n!r} is not a parameter of the model" for n in names
                         if n not in params]  # fmt: skip
        for paths in self.extra_modules.values():
            problems += [f"extra module {p!r} is neither a module nor a parameter of the model"
                         for p in paths if p not in modules and p not in params]  # fmt: skip
        for p in self.head_modules:
            need(p, "task-head module")
        if self.slim is not None:
            for path in self.slim.region + self.slim.fixed:
                if path:
                    need(path, "slimming-region module")
            problems += [f"slimmed parameter {n!r} is not a parameter of the model"
                         for n in self.slim.params if n not in params]  # fmt: skip
            for stack, order in self.slim.depth_priority.items():
                if stack not in self.stacks:
                    problems.append(f"depth_priority names {stack!r}, not a stack "
                                    f"({sorted(self.stacks)})")  # fmt: skip
                elif len(order) != len(self.stacks[stack]):
                    problems.append(f"depth_priority[{stack!r}] orders {len(order)} layers; "
                                    f"the stack has {len(self.stacks[stack])}")  # fmt: skip
        if problems:
            raise ValueError(
                f"the anatomy does not match {type(model).__name__} ({len(problems)} "
                "problem(s)):\n  " + "\n  ".join(problems)
            )

    def coverage(self, model: nn.Module) -> CoverageReport:
        """How many of ``model``'s parameters this anatomy declares, per modality.

        Args:
            model: the model.

        Returns:
            A :class:`~vlcompress.models.anatomy.coverage.CoverageReport`.
        """
        return coverage_of(model, self)

    # ------------------------------------------------------------ pruning
    def prunable_weights(self, model: nn.Module) -> dict[Modality, dict[str, nn.Parameter]]:
        """Maskable weight matrices per modality.

        Every ``nn.Linear`` weight inside a layer (and ``nn.MultiheadAttention`` input
        projections), under the layer's modality, plus the declared extra weights. Biases,
        norms, position / type embeddings and the task head are never included, nor bypassed
        layers (their adapters).

        Args:
            model: the model.

        Returns:
            ``{modality: {parameter name: parameter}}`` (the model's own tensors), modalities
            without weights left out.
        """
        params = dict(model.named_parameters())
        out: dict[Modality, dict[str, nn.Parameter]] = {m: {} for m in Modality}
        bypassed = set(self.bypassed(model))
        for x in self.layers:
            if x.name in bypassed:
                continue
            for name in prunable_weights_in(model.get_submodule(x.name), x.name):
                if name in params:
                    out[x.modality][name] = params[name]
        for modality, names in self.extra_weights.items():
            for n in names:
                out[Modality(modality)][n] = params[n]
        return {m: w for m, w in out.items() if w}

    def mask_heads(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[MaskHandle]:
        """Switch attention heads off.

        Works for every layout (separate, fused, packed) and for modules that take the mask
        themselves (``supports_head_mask``). A dead head's context is exactly zero and its
        query and key rows get no gradient. A mask that cannot take effect raises
        ``RuntimeError`` at the next forward.

        Args:
            model: the model.
            masks: ``{attention name: (num_heads,) tensor}``, 1 keeps a head, 0 removes it.

        Returns:
            Handles; ``handle.remove()`` brings back the previous mask of that block (or none).

        Raises:
            KeyError: for an unknown block.
            ValueError: for a mask of the wrong shape, or a block inside a bypassed layer.

        Example::

            (h,) = anatomy.mask_heads(model, {"blocks.0.attn": torch.tensor([1., 0., 1.])})
            h.remove()
        """
        specs = [(self.attention(name), mask) for name, mask in masks.items()]
        for spec, _ in specs:
            self._check_live(model, spec.name, f"attention block {spec.name!r}")
        return [add_head_mask(model, spec, mask) for spec, mask in specs]

    def mask_ffn_units(
        self, model: nn.Module, masks: Mapping[str, torch.Tensor]
    ) -> list[MaskHandle]:
        """Switch FFN units off (the down projection's inputs are multiplied by the mask).

        Args:
            model: the model.
            masks: ``{ffn name: (inner_dim,) tensor}``.

        Returns:
            Handles; ``handle.remove()`` brings back the previous mask of that block (or none).

        Raises:
            KeyError: for an unknown block.
            ValueError: for a mask of the wrong shape, or a block inside a bypassed layer.
        """
        handles = []
        for name, mask in masks.items():
            spec = self.ffn(name)
            self._check_live(model, spec.down, f"FFN block {spec.name!r}")
            owner = self.layer_of(spec.down)
            layer = owner.name if owner is not None else None
            handles.append(add_unit_mask(model, spec, mask, layer))
        return handles

    def head_weights(
        self, model: nn.Module, name: str, head: int
    ) -> dict[str, tuple[nn.Parameter, tuple[slice, slice]]]:
        """Where head ``head`` of block ``name`` lives: ``{"q"|"k"|"v"|"out": (weight, index)}``.

        Args:
            model: the model.
            name: the attention block.
            head: the head.

        Returns:
            ``weight[index]`` is the head's rows of q/k/v (columns of out), for every layout.
        """
        return head_weights(model, self.attention(name), head)

    # ------------------------------------------------------------ depth / skipping
    def replace_layer(self, model: nn.Module, name: str, replacement: nn.Module) -> nn.Module:
        """Put ``replacement`` where layer ``name`` is.

        Args:
            model: the model.
            name: a declared layer.
            replacement: the module to put there (the original, to restore a layer).

        Returns:
            The module that was there.

        Raises:
            KeyError: for an undeclared layer.
        """
        self.layer(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if child.isdigit() and isinstance(parent, (nn.ModuleList, nn.Sequential)):
            original = parent[int(child)]
            parent[int(child)] = replacement
        else:
            original = getattr(parent, child)
            setattr(parent, child, replacement)
        return original

    def bypass_layer(
        self,
        model: nn.Module,
        name: str,
        adapter: nn.Module | Sequence[nn.Module | None] | None = None,
    ) -> nn.Module:
        """Skip layer ``name``: it returns its input streams (through ``adapter`` if given) in
        exactly the structure its caller expects (declared, learned by :meth:`learn_calls`, or
        learned on the first call).

        Args:
            model: the model.
            name: a declared layer.
            adapter: a module for the stream, or one per stream (``None`` = identity).

        Returns:
            The module that was there: the original layer (restore it with
            :meth:`replace_layer`), or the previous bypass when the layer was bypassed already.

        Raises:
            KeyError: for an undeclared layer.

        Example::

            original = anatomy.bypass_layer(model, "encoder.layer.3")
            ...
            anatomy.replace_layer(model, "encoder.layer.3", original)
        """
        spec = self.layer(name)
        current = model.get_submodule(name)
        bypass = LayerBypass.standing_in_for(current, adapter, spec.streams, spec.output)
        return self.replace_layer(model, name, bypass)

    def skip_layer(
        self,
        model: nn.Module,
        name: str,
        adapter: nn.Module | Sequence[nn.Module | None] | None = None,
    ) -> None:
        """Skip layer ``name`` in place: it returns its input streams (in exactly the
        structure its caller expects), through ``adapter`` if given, until
        :meth:`unskip_layer`.

        Unlike :meth:`bypass_layer` the layer stays in the model: its parameters stay in
        ``model.parameters()`` and ``state_dict`` (an optimiser and a checkpoint see no
        change), which suits switching layers on and off every step (depth slimming, skipping
        search). The adapter is not added to the model either (its owner keeps it). Skipping
        a skipped layer again replaces its adapters.

        Args:
            model: the model.
            name: a declared layer.
            adapter: a module for the first stream, or one module (or ``None``) per stream.

        Raises:
            KeyError: for an undeclared layer.
            ValueError: for more adapters than the layer has streams.
        """
        spec = self.layer(name)
        layer = model.get_submodule(name)
        adapters = [adapter] if adapter is None or isinstance(adapter, nn.Module) else list(adapter)
        if len(adapters) > len(spec.streams):
            raise ValueError(
                f"{len(adapters)} adapters for layer {name!r}, which has "
                f"{len(spec.streams)} stream(s) {spec.streams}."
            )
        adapters += [None] * (len(spec.streams) - len(adapters))
        current = layer.__dict__.get("forward")
        output = spec.output or self.learned_outputs.get(name)
        if isinstance(current, SkipForward):
            output = current.output or output
        layer.__dict__["forward"] = SkipForward(layer, spec.streams, output, adapters)

    def unskip_layer(self, model: nn.Module, name: str) -> None:
        """Run layer ``name`` again after :meth:`skip_layer` (nothing happens if it is not
        skipped).

        Raises:
            KeyError: for an undeclared layer.
        """
        self.layer(name)
        layer = model.get_submodule(name)
        skip = layer.__dict__.get("forward")
        if isinstance(skip, SkipForward):
            if skip.output is not None:
                self.learned_outputs[name] = skip.output
            del layer.__dict__["forward"]

    def skipped(self, model: nn.Module) -> list[str]:
        """The declared layers now skipped in place (:meth:`skip_layer`)."""
        modules = dict(model.named_modules())
        return [x.name for x in self.layers
                if isinstance(getattr(modules.get(x.name), "__dict__", {}).get("forward"), SkipForward)]  # fmt: skip

    def depth_priority(self, stack: str) -> tuple[int, ...]:
        """The order in which ``stack`` keeps its layers when depth shrinks (declared in
        :attr:`slim`, else :func:`~vlcompress.models.anatomy.specs.default_depth_priority`).

        Raises:
            KeyError: for an unknown stack.
        """
        if stack not in self.stacks:
            raise KeyError(f"unknown stack {stack!r}; the anatomy has {sorted(self.stacks)}")
        declared = self.slim.depth_priority.get(stack) if self.slim is not None else None
        return declared or default_depth_priority(len(self.stacks[stack]))

    def learn_calls(self, model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, OutputTemplate]:
        """Run ``model(*args, **kwargs)`` once (without gradients) and record, for every layer
        that does not declare it, where its streams go in its output.

        Args:
            model: the model.
            *args: an example input, as the model takes it.
            **kwargs: keyword arguments of that call.

        Returns:
            ``{layer name: output template}`` for the layers that ran; the anatomy's
            :attr:`layers` are updated with them.

        Raises:
            ValueError: when a layer's output does not contain its streams.
        """
        learned: dict[str, OutputTemplate] = {}
        handles = []
        for spec in self.layers:
            module = model.get_submodule(spec.name)
            if isinstance(module, LayerBypass):
                continue
            names = _positional_names(module.forward)

            def hook(_m, a, kw, out, spec=spec, names=names):
                streams = _get_streams(spec.streams, a, kw, names)
                template = output_template(out, streams)
                if learned.setdefault(spec.name, template) != template:
                    raise ValueError(
                        f"layer {spec.name} returned two different structures in one forward "
                        f"({learned[spec.name]} and {template}); declare LayerSpec.output."
                    )

            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        try:
            with torch.no_grad():
                model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        self.layers = [
            dataclasses.replace(x, output=learned[x.name])
            if x.output is None and x.name in learned
            else x
            for x in self.layers
        ]
        log.debug("learned the output structure of %d layers", len(learned))
        return learned

    # ------------------------------------------------------------ attached modules
    def attach(
        self, model: nn.Module, readout: str, module: nn.Module | Any
    ) -> torch.utils.hooks.RemovableHandle:
        """Pass the output of read-out ``readout`` through ``module`` (an adapter) from now on.

        The module is *not* added to ``model``: its parameters stay out of
        ``model.parameters()`` and ``state_dict`` (whoever attaches it owns it: a callback's
        ``own_module``). It follows the hidden state's device on every call.

        Args:
            model: the model.
            readout: a declared read-out (see :attr:`readouts`).
            module: ``hidden -> hidden`` of the same shape (e.g. ``x + up(act(down(x)))``).

        Returns:
            The hook's handle: ``handle.remove()`` detaches the module.

        Raises:
            KeyError: for an unknown read-out.

        Example::

            handle = anatomy.attach(model, "encoder.layer.3", adapter)
            ...
            handle.remove()
        """
        if readout not in self.readouts:
            raise KeyError(f"no read-out {readout!r}; known: {sorted(self.readouts)}")
        path, _, item = self.readouts[readout].partition("#")
        index = int(item) if item else None

        def hook(_m: nn.Module, _a: Any, output: Any) -> Any:
            hidden = _pick(output, index)
            if isinstance(module, nn.Module):
                first = next(module.parameters(), None)
                if first is not None and first.device != hidden.device:
                    module.to(hidden.device)
            return _put(output, index, module(hidden))

        return model.get_submodule(path).register_forward_hook(hook)

    # ------------------------------------------------------------ distillation
    @contextlib.contextmanager
    def capture(
        self, model: nn.Module, names: Sequence[str] | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Collect the outputs of read-out points during forward passes.

        Args:
            model: the model.
            names: read-outs to collect (default: all).

        Yields:
            A dict filled by every forward pass run inside the block (the last call wins).

        Raises:
            KeyError: for an unknown read-out.

        Example::

            with anatomy.capture(model) as states:
                model(batch)
            states["encoder.5"]  # (B, T, D)
        """
        states: dict[str, torch.Tensor] = {}
        handles = []
        for key in names if names is not None else list(self.readouts):
            if key not in self.readouts:
                raise KeyError(f"no read-out {key!r}; known: {sorted(self.readouts)}")
        try:
            for key in names if names is not None else list(self.readouts):
                path, _, item = self.readouts[key].partition("#")
                index = int(item) if item else None

                def hook(_m, _a, output, key=key, index=index):
                    states[key] = _pick(output, index)

                handles.append(model.get_submodule(path).register_forward_hook(hook))
            yield states
        finally:
            for h in handles:
                h.remove()
