"""Lightning callbacks (installed as ``vlcompress.callbacks``): compression methods and guards.

Every callback talks to models only through :mod:`vlcompress.models.anatomy`, so it works in
other people's Lightning projects too.
"""

from vlcompress.callbacks.finite_loss_guard import FiniteLossGuard, NonFiniteLossError

CALLBACKS: dict[str, type] = {"finite_loss_guard": FiniteLossGuard}
"""Callbacks an experiment may list under ``callbacks:`` by name."""

__all__ = ["CALLBACKS", "FiniteLossGuard", "NonFiniteLossError"]
