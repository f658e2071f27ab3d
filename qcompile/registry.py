"""Registries of passes, calibrators and evaluation metrics, and plugin loading.

Built-ins register through the same decorators third parties use. Third-party packages add
entries through the entry-point groups ``qcompile.passes`` / ``qcompile.calibrators`` /
``qcompile.metrics`` (each entry
point names a module or a registered class), or on the command line with ``--plugin module``.
"""
from __future__ import annotations

import difflib
import importlib
import logging
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

from .errors import QCompileError, UnknownNameError

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Registry(Generic[T]):
    """name -> class, for one kind of plugin."""

    def __init__(self, kind: str, entry_point_group: str):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(cls: T) -> T:
            existing = self._entries.get(name)
            if existing is not None and existing is not cls:
                raise QCompileError(f"{self.kind} name '{name}' is registered twice: "
                                    f"{_where(existing)} and {_where(cls)}")
            cls.name = name  # type: ignore[attr-defined]
            self._entries[name] = cls
            return cls
        return decorate

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UnknownNameError(self.unknown_message(name))
        return self._entries[name]

    def unknown_message(self, name: str) -> str:
        known = ", ".join(sorted(self._entries)) or "none"
        close = difflib.get_close_matches(name, self._entries, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown {self.kind} '{name}' (known: {known}){hint}"

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def load_entry_points(self) -> None:
        for ep in entry_points(group=self.entry_point_group):
            try:
                loaded = ep.load()
            except Exception as exc:  # a broken third-party plugin must not hide which one it is
                raise QCompileError(f"plugin entry point '{ep.name} = {ep.value}' "
                                    f"({self.entry_point_group}) failed to load: {exc}") from exc
            if isinstance(loaded, type) and loaded not in self._entries.values():
                self.register(ep.name)(loaded)


def _where(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"


PASSES: Registry = Registry("pass", "qcompile.passes")
CALIBRATORS: Registry = Registry("calibrator", "qcompile.calibrators")
METRICS: Registry = Registry("metric", "qcompile.metrics")
register_pass = PASSES.register
register_calibrator = CALIBRATORS.register
register_metric = METRICS.register

_loaded = False


def load_builtins_and_entry_points() -> None:
    """Import the built-in passes and calibrators, then third-party entry points (once)."""
    global _loaded
    if _loaded:
        return
    importlib.import_module("qcompile.calibrators")
    importlib.import_module("qcompile.passes")
    importlib.import_module("qcompile.metrics")
    CALIBRATORS.load_entry_points()
    PASSES.load_entry_points()
    METRICS.load_entry_points()
    _loaded = True


def load_plugin(module: str) -> None:
    """Import a plugin module by dotted path (--plugin); its decorators register it."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise QCompileError(f"--plugin {module}: module not found ({exc.name}); "
                            "check the dotted path and that it is on PYTHONPATH") from exc
    except Exception as exc:
        raise QCompileError(f"--plugin {module}: import failed: {type(exc).__name__}: {exc}") from exc
