"""Shared core: find modules by dotted name, record or replace their outputs inside scoped contexts,
and freeze/restore model state on every exit path.

Every job of semlens (explaining, dissecting, naming, correcting) goes through these helpers, so
that hook handles and model state are owned in one place and always cleaned up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from semlens.errors import suggest

__all__ = [
    "UnknownLayerError",
    "get_module",
    "resolve_layers",
    "HookHandles",
    "capture_activations",
    "patch_activations",
    "frozen",
    "count_hooks",
    "suggest",
]


class UnknownLayerError(KeyError):
    """A dotted layer name that does not exist in the model."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0])


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the sub-module of ``model`` called ``name`` (dotted path, as in ``named_modules()``).

    The empty string is the model itself. An unknown name raises :class:`UnknownLayerError`
    listing the closest existing names.
    """
    if name == "":
        return model
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    hint = suggest(name, [n for n in modules if n], n=5, cutoff=0.4)
    available = [n for n in modules if n][:30]
    raise UnknownLayerError(
        f"unknown layer {name!r} in {type(model).__name__}.{hint} "
        f"Available layers include: {', '.join(available)}"
    )


def resolve_layers(model: nn.Module, names: str | Sequence[str]) -> dict[str, nn.Module]:
    """Map each dotted name (a comma-separated string or a sequence) to its module, in order."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise ValueError("no layer names given")
    return {n: get_module(model, n) for n in names}


class HookHandles:
    """A list of removable hook handles, removed all at once (also on exceptions)."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def add(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self._handles.append(handle)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> HookHandles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _first_tensor(output: object, name: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"layer {name!r} returned {type(output).__name__}, not a tensor")


@contextlib.contextmanager
def capture_activations(
    model: nn.Module,
    names: str | Sequence[str],
    *,
    detach: bool = True,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the named layers during forward passes inside the ``with`` block.

    Yields a dict ``name -> tensor`` overwritten by every forward call (the latest batch).
    ``transform(name, out)`` may reduce the tensor before it is stored (e.g. pool it).
    Hooks are removed on exit, whatever happens inside the block.
    """
    layers = resolve_layers(model, names)
    store: dict[str, torch.Tensor] = {}

    def make_hook(layer_name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            out = _first_tensor(output, layer_name)
            if detach:
                out = out.detach()
            store[layer_name] = transform(layer_name, out) if transform else out

        return hook

    with HookHandles() as handles:
        for layer_name, module in layers.items():
            handles.add(module.register_forward_hook(make_hook(layer_name)))
        yield store


@contextlib.contextmanager
def patch_activations(
    model: nn.Module, patches: dict[str, Callable[[torch.Tensor], torch.Tensor]]
) -> Iterator[None]:
    """Replace the output ``y`` of each named layer by ``fn(y)`` during forwards inside the block."""
    layers = resolve_layers(model, list(patches))

    def make_hook(fn: Callable[[torch.Tensor], torch.Tensor], layer_name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> torch.Tensor:
            return fn(_first_tensor(output, layer_name))

        return hook

    with HookHandles() as handles:
        for layer_name, module in layers.items():
            handles.add(module.register_forward_hook(make_hook(patches[layer_name], layer_name)))
        yield


@contextlib.contextmanager
def frozen(model: nn.Module, *, eval_mode: bool = True, freeze_params: bool = True) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and stop parameter gradients; restore both on exit.

    Every module's ``training`` flag and every parameter's ``requires_grad`` are restored exactly as
    they were, on every exit path including exceptions. Parameter ``.grad`` is never touched.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if eval_mode:
            model.eval()
        if freeze_params:
            for p, _ in flags:
                p.requires_grad_(False)
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def count_hooks(model: nn.Module) -> int:
    """Number of hooks registered on all modules of ``model`` (for leak checks in tests)."""
    total = 0
    for m in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
            "_load_state_dict_pre_hooks",
        ):
            total += len(getattr(m, attr, {}) or {})
    return total


def iter_leaf_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """Yield ``(dotted name, module)`` for every module without children."""
    for name, module in model.named_modules():
        if next(module.children(), None) is None:
            yield name, module
