"""Skipping a layer: a stand-in that returns exactly what the caller of the layer expects.

A layer's caller unpacks its output in its own way: ``hidden = layer(h)`` (BERT in
transformers 5), ``hidden = layer(h)[0]`` (LXMERT, ViLT), ``lang, vis = layer(l, ..., v, ...)``
(LXMERT's cross layer). A bypass must return the same structure with the layer's input streams
in place of its outputs. That structure is an :data:`~vlcompress.models.anatomy.specs.OutputTemplate`,
declared in :class:`~vlcompress.models.anatomy.specs.LayerSpec` or learned from a real call:
:func:`output_template` reads it off one call of the real layer (what
:meth:`~vlcompress.models.anatomy.Anatomy.learn_calls` does for every layer at once), and a
bypass without a template learns it on its first call by running the original layer once on
``meta`` tensors (no compute, no memory), or on the real inputs if the layer cannot run on
``meta``.

A bypass is an instance of a subclass of the original layer's class, and shares the original's
forward hooks, so code that finds layers by class or by hook (transformers 5 records
``output_hidden_states`` with hooks keyed on the layer class) still sees a layer at that place:
the hidden-states tuple keeps its length, the bypassed entry equals the one before it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from vlcompress.models.anatomy.specs import OutputTemplate, Stream, _check_template

__all__ = ["LayerBypass", "SkipForward", "build_output", "output_template"]

log = logging.getLogger(__name__)

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


# ---------------------------------------------------------------------- stream arguments
def _positional_names(fn: Any) -> list[str]:
    """Names of the parameters of ``fn`` that may be passed positionally, in order."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds]


def _find_stream(
    ref: int | str, args: tuple, kwargs: Mapping[str, Any], names: Sequence[str]
) -> tuple[str, int | str]:
    """Where stream ``ref`` is in one call: ``("arg", position)`` or ``("kwarg", name)``."""
    if isinstance(ref, int):
        if ref < len(args):
            return "arg", ref
        name = names[ref] if ref < len(names) else None
    else:
        name = ref
        if name in names and names.index(name) < len(args) and name not in kwargs:
            return "arg", names.index(name)
    if name is not None and name in kwargs:
        return "kwarg", name
    if name is None and not args and len(kwargs) == 1:  # a lone keyword argument
        return "kwarg", next(iter(kwargs))
    raise TypeError(
        f"the layer was called without its hidden-state stream {ref!r} (got {len(args)} "
        f"positional argument(s) and keywords {sorted(kwargs)}); declare the right "
        "LayerSpec.streams (positional indices or parameter names of the layer's forward)."
    )


def _get_streams(
    refs: Sequence[int | str], args: tuple, kwargs: Mapping[str, Any], names: Sequence[str]
) -> list[Any]:
    out = []
    for ref in refs:
        where, key = _find_stream(ref, args, kwargs, names)
        out.append(args[key] if where == "arg" else kwargs[key])
    return out


# ---------------------------------------------------------------------- output templates
def output_template(output: Any, streams: Sequence[Any]) -> OutputTemplate:
    """The template of one real output: where each input stream's counterpart is.

    A tensor of the output is matched to the input stream it *is* (a layer that passes a
    stream through), else to the one not yet matched stream of the same shape; tensors matching
    no stream (attention weights) and non-tensors become ``None``.

    Args:
        output: what the layer returned (a tensor, or tuples / lists / dicts of them).
        streams: the layer's input streams, in declared order.

    Returns:
        The template; :func:`build_output` rebuilds the output from it.

    Raises:
        ValueError: when a stream is not in the output, or when several streams have the
            shape of one output tensor (the template must then be declared).

    Example::

        output_template((h_out, probs), [h_in])  # -> (Stream(0), None)
    """
    used: set[int] = set()
    shapes = [tuple(s.shape) if isinstance(s, torch.Tensor) else None for s in streams]

    def encode(obj: Any) -> OutputTemplate:
        if isinstance(obj, torch.Tensor):
            for i, s in enumerate(streams):
                if obj is s and i not in used:
                    used.add(i)
                    return Stream(i)
            same = [i for i, shape in enumerate(shapes) if i not in used and shape == obj.shape]
            if len(same) > 1:
                raise ValueError(
                    f"cannot tell which of the streams {same} (all of shape {tuple(obj.shape)}) "
                    "a tensor of the layer's output is; declare LayerSpec.output (e.g. "
                    "(Stream(0), Stream(1))), or learn it from an input whose streams differ "
                    "in shape."
                )
            if same:
                used.add(same[0])
                return Stream(same[0])
            return None
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return tuple(encode(x) for x in obj)
        if isinstance(obj, list):
            return [encode(x) for x in obj]
        if isinstance(obj, dict) and type(obj) is dict:
            return {k: encode(v) for k, v in obj.items()}
        return None

    template = encode(output)
    if len(used) != len(streams):
        missing = sorted(set(range(len(streams))) - used)
        raise ValueError(
            f"cannot find stream(s) {missing} in the layer's output (a {type(output).__name__}"
            f" whose tensors have shapes {_shapes(output)}; the streams have shapes {shapes}); "
            "declare LayerSpec.output (e.g. (Stream(0), Stream(1)))."
        )
    return template


def _shapes(obj: Any) -> list[tuple[int, ...]]:
    if isinstance(obj, torch.Tensor):
        return [tuple(obj.shape)]
    if isinstance(obj, (tuple, list)):
        return [s for x in obj for s in _shapes(x)]
    if isinstance(obj, dict):
        return [s for x in obj.values() for s in _shapes(x)]
    return []


def build_output(template: OutputTemplate, streams: Sequence[Any]) -> Any:
    """Fill ``template`` with ``streams`` (the inverse of :func:`output_template`).

    Args:
        template: an output template.
        streams: the values to put where the template says ``Stream(i)``.

    Returns:
        A tensor or tuple / list / dict of the same structure as the layer's real output.
    """
    if isinstance(template, Stream):
        return streams[template.index]
    if isinstance(template, tuple):
        return tuple(build_output(t, streams) for t in template)
    if isinstance(template, list):
        return [build_output(t, streams) for t in template]
    if isinstance(template, dict):
        return {k: build_output(t, streams) for k, t in template.items()}
    return None


# ---------------------------------------------------------------------- probing the original
@contextlib.contextmanager
def _quiet(module: nn.Module) -> Iterator[None]:
    """Run ``module`` without its forward hooks, and undo changes to its plain attributes."""
    saved = []
    for m in module.modules():
        hooks = {name: getattr(m, name) for name in _HOOK_DICTS if hasattr(m, name)}
        plain = {k: v for k, v in vars(m).items() if k not in _MODULE_INTERNALS}
        saved.append((m, hooks, plain))
        for name, d in hooks.items():
            object.__setattr__(m, name, type(d)())
    try:
        yield
    finally:
        for m, hooks, plain in saved:
            for name, d in hooks.items():
                object.__setattr__(m, name, d)
            for k in [k for k in vars(m) if k not in _MODULE_INTERNALS and k not in plain]:
                del m.__dict__[k]
            m.__dict__.update(plain)


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device)
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_to(x, device) for x in obj)
    if isinstance(obj, list):
        return [_to(x, device) for x in obj]
    if isinstance(obj, dict) and type(obj) is dict:
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _first_device(obj: Any) -> torch.device | None:
    if isinstance(obj, torch.Tensor):
        return obj.device
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    for x in items:
        d = _first_device(x)
        if d is not None:
            return d
    return None


def _probe(
    original: nn.Module, refs: Sequence[int | str], names: Sequence[str], args: tuple, kwargs: dict
) -> OutputTemplate:
    """Learn ``original``'s output template by running it once (meta first, then for real)."""
    from torch.func import functional_call

    device = _first_device((args, kwargs)) or torch.device("cpu")
    state = dict(original.named_parameters(remove_duplicate=False))
    state.update(original.named_buffers(remove_duplicate=False))
    errors = []
    for target in ("meta", device):
        a, kw = _to(args, target), _to(kwargs, target)
        params = {n: t.detach().to(target) for n, t in state.items()}
        streams = _get_streams(refs, a, kw, names)
        fork = [device] if device.type == "cuda" else []
        try:
            with _quiet(original), torch.no_grad(), torch.random.fork_rng(devices=fork):
                out = functional_call(original, params, a, kw, strict=False)
            return output_template(out, streams)
        except Exception as err:  # noqa: BLE001 - every failure is reported below
            errors.append(f"on {target}: {type(err).__name__}: {err}")
    raise RuntimeError(
        f"could not learn the output structure of the bypassed {type(original).__name__} "
        f"({'; '.join(errors)}). Declare LayerSpec.output, or call "
        "anatomy.learn_calls(model, example_input) before bypassing."
    )


# ---------------------------------------------------------------------- the bypass module
def _rebuild(base: type | None, state: dict) -> LayerBypass:
    cls = LayerBypass if base is None else LayerBypass._subclass_for(base)
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


class LayerBypass(nn.Module):
    """Stands in for a skipped layer: returns its input streams, optionally through adapters.

    Build one with :meth:`standing_in_for` (what
    :meth:`~vlcompress.models.anatomy.Anatomy.bypass_layer` does) to get an instance of a
    subclass of the layer's class that shares its forward hooks; the plain constructor gives a
    bare module for layers whose output structure is declared.

    Args:
        adapter: a module applied to the stream (``None`` = identity: the layer is dropped), or
            one module (or ``None``) per stream for a multi-stream layer.
        streams: the forward inputs carrying the streams (positional indices or parameter
            names), as :attr:`~vlcompress.models.anatomy.specs.LayerSpec.streams`.
        output: the output template; ``None`` = the bare stream for one stream, a tuple of the
            streams for several (or, with ``standing_in_for``, learned on the first call).
        signature: parameter names of the original layer's forward, in positional order
            (resolves streams given by name but passed positionally, and the reverse).

    Raises:
        ValueError: when the number of adapters differs from the number of streams, or the
            template refers to a stream that does not exist.

    Example::

        bypass = LayerBypass(adapter=nn.Linear(32, 32), output=(Stream(0), None))
        model.encoder.layer[3] = bypass
    """

    _subclasses: dict[type, type] = {}

    def __init__(
        self,
        adapter: nn.Module | Sequence[nn.Module | None] | None = None,
        streams: Sequence[int | str] = (0,),
        output: OutputTemplate = None,
        signature: Sequence[str] = (),
    ) -> None:
        nn.Module.__init__(self)
        self._setup(adapter, streams, output, signature)

    def _setup(
        self,
        adapter: nn.Module | Sequence[nn.Module | None] | None,
        streams: Sequence[int | str],
        output: OutputTemplate,
        signature: Sequence[str],
    ) -> None:
        streams = tuple(streams)
        if adapter is None or isinstance(adapter, nn.Module):
            adapters = [adapter] + [None] * (len(streams) - 1)
        else:
            adapters = list(adapter)
        if len(adapters) != len(streams):
            raise ValueError(
                f"got {len(adapters)} adapter(s) for a layer with {len(streams)} stream(s) "
                f"{streams}; give one module (or None) per stream."
            )
        _check_template("LayerBypass", output, len(streams))
        self.adapters = nn.ModuleList(a if a is not None else nn.Identity() for a in adapters)
        self.streams = streams
        self.output_template = output
        self.signature = tuple(signature)
        object.__setattr__(self, "_original", None)

    # -------------------------------------------------------------- construction
    @classmethod
    def _subclass_for(cls, base: type) -> type:
        if issubclass(base, LayerBypass):
            return base
        if base not in cls._subclasses:
            sub = type(
                f"{base.__name__}Bypass",
                (LayerBypass, base),
                {"__module__": __name__, "__doc__": f"A bypassed {base.__name__}."},
            )
            cls._subclasses[base] = sub
        return cls._subclasses[base]

    @classmethod
    def standing_in_for(
        cls,
        original: nn.Module,
        adapter: nn.Module | Sequence[nn.Module | None] | None = None,
        streams: Sequence[int | str] = (0,),
        output: OutputTemplate = None,
    ) -> LayerBypass:
        """A bypass for ``original``: an instance of a subclass of its class, sharing its
        forward hooks and plain attributes (not its parameters or submodules).

        Args:
            original: the layer to stand in for.
            adapter: as in the constructor.
            streams: as in the constructor.
            output: the output template; ``None`` = learn it on the first call by running
                ``original`` once (meta tensors first).

        Returns:
            The bypass, in ``original``'s training mode. For an ``original`` that is a bypass
            already, a new bypass of the same layer (e.g. with other adapters).
        """
        layer, signature = original, _positional_names(original.forward)
        if isinstance(original, LayerBypass):  # a new bypass (other adapters) for the same layer
            layer, signature = original._original, original.signature
            output = original.output_template if output is None else output
        sub = cls._subclass_for(type(original))
        bypass = sub.__new__(sub)
        nn.Module.__init__(bypass)
        for key, value in vars(original).items():
            if key not in _MODULE_INTERNALS:
                object.__setattr__(bypass, key, value)
        LayerBypass._setup(bypass, adapter, streams, output, signature)
        for name in _HOOK_DICTS:  # the same dicts: hooks added or removed later apply to both
            if hasattr(original, name):
                object.__setattr__(bypass, name, getattr(original, name))
        object.__setattr__(bypass, "_original", layer if output is None else None)
        bypass.train(original.training)
        return bypass

    def __reduce_ex__(self, protocol: int) -> Any:
        """Pickle by the original layer class (the bypass subclass is made at run time)."""
        bases = [b for b in type(self).__mro__[1:] if b not in (LayerBypass,)]
        base = None if type(self) is LayerBypass else next(iter(bases))
        return _rebuild, (base, self.__dict__.copy())

    # -------------------------------------------------------------- forward
    @property
    def adapter(self) -> nn.Module | None:
        """The adapter of the first stream (``None`` when it is the identity)."""
        first = self.adapters[0]
        return None if isinstance(first, nn.Identity) else first

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Return the input streams (through the adapters) in the layer's output structure."""
        streams = _get_streams(self.streams, args, kwargs, self.signature)
        if self.output_template is None:
            if self._original is not None:
                self.output_template = _probe(
                    self._original, self.streams, self.signature, args, kwargs
                )
                log.debug("learned the output of %s: %r", type(self._original).__name__,
                          self.output_template)  # fmt: skip
                object.__setattr__(self, "_original", None)
            else:
                self.output_template = (
                    Stream(0)
                    if len(streams) == 1
                    else tuple(Stream(i) for i in range(len(streams)))
                )
        out = [adapter(s) for adapter, s in zip(self.adapters, streams)]
        return build_output(self.output_template, out)

    def extra_repr(self) -> str:
        """Streams and output structure."""
        return f"streams={self.streams}, output={self.output_template}"


# ---------------------------------------------------------------------- skipping in place
class SkipForward:
    """A layer's ``forward`` while it is skipped in place (see :meth:`Anatomy.skip_layer`).

    Set as an instance attribute of the layer, it shadows the class's ``forward``: the layer
    stays where it is (its parameters stay in ``state_dict``, its hooks still fire) but returns
    its input streams in its output structure. Without a declared template the structure is
    learned on the first call by running the layer's own forward once.

    Args:
        layer: the layer.
        streams: as :attr:`~vlcompress.models.anatomy.specs.LayerSpec.streams`.
        output: the output template (``None`` = learn it on the first call).
        adapters: one module (or ``None``) per stream that the stream passes through (a skip
            adapter standing in for the layer); not registered in the layer: whoever made it
            owns it.
    """

    def __init__(
        self,
        layer: nn.Module,
        streams: Sequence[int | str],
        output: OutputTemplate,
        adapters: Sequence[nn.Module | None] = (),
    ) -> None:
        self.layer = layer
        self.streams = tuple(streams)
        self.output = output
        self.signature = tuple(_positional_names(type(layer).forward)[1:])
        self.adapters = tuple(adapters) or (None,) * len(self.streams)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Return the input streams (through the adapters) in the layer's output structure."""
        streams = _get_streams(self.streams, args, kwargs, self.signature)
        if self.output is None:
            with torch.no_grad():
                out = type(self.layer).forward(self.layer, *args, **kwargs)
            self.output = output_template(out, streams)
        streams = [s if a is None else a(s) for a, s in zip(self.adapters, streams)]
        return build_output(self.output, streams)
