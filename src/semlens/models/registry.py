"""Model specs: a built-in name (``alexnet-like``) or ``package.module:factory`` for the user's own model."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["register_model", "build_model", "available_models", "resolve_factory", "accepted_kwargs", "ModelSpecError"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class ModelSpecError(ValueError):
    """A model spec that names no built-in model and no importable factory."""


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make ``factory(**kwargs) -> nn.Module`` available under ``name``."""

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model name {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_models() -> list[str]:
    """Names of the built-in models."""
    _load_builtins()
    return sorted(_REGISTRY)


def _load_builtins() -> None:
    importlib.import_module("semlens.models")


@contextlib.contextmanager
def _importable_from(directory: str) -> Iterator[None]:
    """``directory`` first on ``sys.path`` while a user's model module is imported (and its factory called), removed
    after: semlens leaves the process's import path as it found it."""
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        yield
    finally:
        if added and directory in sys.path:
            sys.path.remove(directory)


def resolve_factory(spec: str) -> Callable[..., nn.Module]:
    """The factory behind ``spec``: a built-in name or ``package.module:factory``.

    ``package.module`` is imported from the current directory or ``PYTHONPATH``; ``factory`` is any
    callable returning an ``nn.Module`` (a class or a function).
    """
    _load_builtins()
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" not in spec:
        raise ModelSpecError(
            f"unknown model {spec!r}: not a built-in ({', '.join(sorted(_REGISTRY))}) "
            "and not of the form package.module:factory"
        )
    module_name, _, attr = spec.partition(":")
    try:
        with _importable_from(str(Path.cwd())):
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelSpecError(f"cannot import {module_name!r} for model spec {spec!r}: {err}") from err
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelSpecError(f"{module_name!r} has no callable {attr!r} (model spec {spec!r})")
    return factory


def accepted_kwargs(factory: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The part of ``kwargs`` that ``factory``'s signature accepts (all of it when it takes ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: pass everything
        return dict(kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(kwargs)
    names = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                  inspect.Parameter.KEYWORD_ONLY)}
    return {k: v for k, v in kwargs.items() if k in names}


def build_model(spec: str, **kwargs: Any) -> nn.Module:
    """Instantiate a model from a built-in name or ``package.module:factory``.

    The factory receives only the keyword arguments its signature accepts (``num_classes``,
    ``image_size``, ``width`` ... are offered by the commands; a factory taking none of them is fine).
    """
    factory = resolve_factory(spec)
    with _importable_from(str(Path.cwd())):  # a factory may import its own modules when called
        model = factory(**accepted_kwargs(factory, kwargs))
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
