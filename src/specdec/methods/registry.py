"""The method registry: every method module registers itself; the engine looks methods up here."""

from __future__ import annotations

import importlib
import pkgutil

from specdec.methods.base import Method

_METHODS: dict[str, Method] = {}
_discovered = False


def register(method: Method) -> Method:
    """Called by each method module at import."""
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(f"method {method.name!r} is registered twice")
    _METHODS[method.name] = method
    return method


def _discover() -> None:
    # Import every module of this package once, so each registers its method.
    global _discovered
    if _discovered:
        return
    package = importlib.import_module("specdec.methods")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name not in ("base", "registry"):
            importlib.import_module(f"specdec.methods.{info.name}")
    _discovered = True


def all_methods() -> dict[str, Method]:
    """Every method, in listing order (each method's `list_rank`, then its name)."""
    _discover()
    names = sorted(_METHODS, key=lambda n: (_METHODS[n].list_rank, n))
    return {n: _METHODS[n] for n in names}


def get_method(name: str) -> Method:
    methods = all_methods()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(methods)}")
    return methods[name]
