"""The one way a vlcompress callback changes training: a ledger of undoable effects.

Every change a :class:`~vlcompress.callbacks.base.CompressionCallback` makes to the user's
module goes through the base class, which records it here and undoes it in its ``teardown``:

* **hooks** — forward hooks, the anatomy's masks (``mask_heads``, ``mask_ffn_units``), owned
  modules attached at a read-out, hidden-state captures, a
  :class:`~vlcompress.compress.slimmable.Slimmable`: anything with ``remove()`` (or an undo
  function) is recorded with :meth:`Effects.add`;
* **the training step** — :func:`wrap_training_step` puts a :class:`WrappedStep` on the
  LightningModule *instance* (the class is never changed). Several callbacks may wrap one
  module: the wrappers form a chain (the first registered is the outermost), and each can be
  removed in any order; when the last is removed the instance attribute goes and the class's
  ``training_step`` is back;
* **quiet calls** — :func:`quiet_logging` silences ``pl_module.log`` for the duration of a
  call (a step run a second time in one optimiser step must not log twice).

After ``teardown`` the module is exactly what it was: no hook, no instance attribute, the
same ``state_dict`` keys. Effects the callback means to keep (masks baked into the weights,
heads physically removed) are changes to the weights, not effects.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Effects", "WrappedStep", "quiet_logging", "wrap_training_step"]

log = logging.getLogger(__name__)

StepWrapper = Callable[..., Any]
"""``wrapper(step, *args, **kwargs) -> result``: calls ``step(*args, **kwargs)`` (the rest of
the chain, ending with the module's own ``training_step``) as often as it needs."""


class Effects:
    """The undoable changes one callback made, undone in reverse order by :meth:`undo`.

    Args:
        owner: the callback's name, for log messages.

    Example::

        effects = Effects("MyCallback")
        effects.add("forward hook on encoder.layer.0", layer.register_forward_hook(fn))
        ...
        effects.undo()  # removes the hook
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._undo: list[tuple[str, Callable[[], Any]]] = []

    def add(self, what: str, undo: Any) -> Any:
        """Record an effect and return ``undo``.

        Args:
            what: a short description (shown by :meth:`describe` and in debug logs).
            undo: a handle with ``remove()`` (hook handles, mask handles) or a function that
                undoes the effect (e.g. ``slimmable.detach``).

        Raises:
            TypeError: ``undo`` is neither.
        """
        if callable(getattr(undo, "remove", None)):
            fn = undo.remove
        elif callable(undo):
            fn = undo
        else:
            raise TypeError(
                f"{self.owner}: an effect needs a handle with remove() or an undo function; "
                f"got {type(undo).__name__} for {what!r}"
            )
        self._undo.append((what, fn))
        return undo

    def add_all(self, what: str, handles: list[Any]) -> list[Any]:
        """Record several handles under one description (e.g. ``anatomy.mask_heads``'s)."""
        for i, h in enumerate(handles):
            self.add(f"{what} [{i}]", h)
        return handles

    def undo(self) -> list[str]:
        """Undo every effect, the last first; returns what was undone.

        Every undo runs even when an earlier one raises; the first error is raised at the end.
        """
        done: list[str] = []
        first: BaseException | None = None
        while self._undo:
            what, fn = self._undo.pop()
            try:
                fn()
                done.append(what)
            except Exception as e:  # keep undoing the rest; report the first failure
                log.error("%s: undoing %s failed: %s", self.owner, what, e)
                first = first or e
        if done:
            log.debug("%s: undid %d effects: %s", self.owner, len(done), done)
        if first is not None:
            raise first
        return done

    def describe(self) -> list[str]:
        """The effects in place, in the order they were made."""
        return [what for what, _ in self._undo]

    def __len__(self) -> int:
        return len(self._undo)


class WrappedStep:
    """The ``training_step`` a LightningModule instance carries while callbacks wrap it.

    It calls the chain of wrappers around the module's own (class) ``training_step``.
    ``__wrapped__`` is that method, so Lightning's ``is_overridden`` still reads the user's
    code.

    Args:
        original: the bound ``training_step`` of the module's class.
    """

    def __init__(self, original: Callable[..., Any]) -> None:
        self.__wrapped__ = original
        self.wrappers: list[tuple[object, StepWrapper]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        step = self.__wrapped__
        for _, wrapper in reversed(self.wrappers):  # the first registered ends outermost
            step = functools.partial(wrapper, step)
        return step(*args, **kwargs)


def wrap_training_step(pl_module: Any, owner: object, wrapper: StepWrapper) -> Callable[[], None]:
    """Put ``wrapper`` around ``pl_module.training_step``; returns the function that removes it.

    Args:
        pl_module: the LightningModule (its instance gets a :class:`WrappedStep`).
        owner: who wraps (one wrapper per owner; wrapping again replaces it).
        wrapper: ``wrapper(step, *args, **kwargs) -> result``.

    Raises:
        TypeError: ``training_step`` was replaced on the instance by something else (another
            library); wrapping over it could not be undone cleanly.
    """
    current = pl_module.__dict__.get("training_step")
    if current is None:
        current = WrappedStep(pl_module.training_step)
        pl_module.__dict__["training_step"] = current
    elif not isinstance(current, WrappedStep):
        raise TypeError(
            f"{type(pl_module).__name__}.training_step was replaced on the instance by "
            f"{current!r}; vlcompress callbacks wrap the class's training_step and cannot "
            "undo a wrapper they did not make. Remove that replacement or do it in the class."
        )
    current.wrappers = [(o, w) for o, w in current.wrappers if o is not owner]
    current.wrappers.append((owner, wrapper))

    def remove() -> None:
        installed = pl_module.__dict__.get("training_step")
        if not isinstance(installed, WrappedStep):
            return
        installed.wrappers = [(o, w) for o, w in installed.wrappers if o is not owner]
        if not installed.wrappers:
            del pl_module.__dict__["training_step"]

    return remove


@contextlib.contextmanager
def quiet_logging(pl_module: Any, quiet: bool = True) -> Iterator[None]:
    """Within the block, ``pl_module.log`` and ``log_dict`` do nothing (when ``quiet``).

    For a callback that runs the user's step more than once per optimiser step: only the first
    run logs. The instance attributes are removed on the way out, whatever happens.
    """
    if not quiet:
        yield
        return
    saved = {k: pl_module.__dict__[k] for k in ("log", "log_dict") if k in pl_module.__dict__}
    pl_module.__dict__["log"] = _no_log
    pl_module.__dict__["log_dict"] = _no_log
    try:
        yield
    finally:
        for k in ("log", "log_dict"):
            if k in saved:
                pl_module.__dict__[k] = saved[k]
            else:
                pl_module.__dict__.pop(k, None)


def _no_log(*_args: Any, **_kwargs: Any) -> None:
    return None
