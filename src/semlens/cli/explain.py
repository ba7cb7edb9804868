"""``semlens explain``: heatmaps for single predictions from the shell (thin layer over :mod:`semlens.explain`)."""

from __future__ import annotations

from pathlib import Path

import typer

from semlens.cli._common import user_errors

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def load_input(path: Path):
    """Read one input file as a float32 tensor: an image -> ``(1, C, H, W)`` in [0, 1]; ``.npy`` ``(C, H, W)`` or
    ``(N, C, H, W)`` -> batched. Returns ``(tensor, was_single)``."""
    import numpy as np
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise ValueError(f"cannot read {path} as a .npy array: {err}") from err
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"{path}: array of dtype {arr.dtype} is not numeric")
        if arr.ndim not in (3, 4):
            raise ValueError(f"{path}: expected (C, H, W) or (N, C, H, W), got shape {arr.shape}")
        single = arr.ndim == 3
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        return (t.unsqueeze(0) if single else t), single
    if suffix in _IMAGE_SUFFIXES:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img = img.convert("L" if img.mode in ("L", "I", "I;16", "1") else "RGB")
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from err
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(0), True
    raise ValueError(f"{path}: unsupported input type {suffix!r} (use an image file or a .npy array)")


def _write_png(path: Path, rel, images, overlay: bool) -> None:
    import numpy as np
    from PIL import Image

    from semlens.explain import heatmap_rgb

    tiles = []
    for i in range(rel.shape[0]):
        r = rel[i]
        img = images[i] if overlay and images is not None and images[i].shape[-2:] == r.shape[-2:] else None
        tiles.append(heatmap_rgb(r if r.ndim >= 2 else r[None, None], img))
    sep = np.full((tiles[0].shape[0], 2, 3), 255, dtype=np.uint8)
    row = [t for tile in tiles for t in (tile, sep)][:-1]
    Image.fromarray(np.concatenate(row, axis=1)).save(path)


def register(app: typer.Typer) -> None:
    @app.command()
    def explain(
        inputs: list[Path] = typer.Argument(None, help="More input files (after --input)."),
        model: str = typer.Option(None, "--model", help="Built-in model name or package.module:factory."),
        weights: Path = typer.Option(None, "--weights", help=".safetensors or .pt weights (loaded safely)."),
        input_: list[Path] = typer.Option(None, "--input", help="Image file or .npy (C,H,W)/(N,C,H,W); repeatable."),
        method: str = typer.Option("epsilon-plus-flat", "--method", help="Attribution method (see --list-methods)."),
        target: str = typer.Option("pred", "--target", help="Class index to explain, or 'pred' (predicted class)."),
        out: Path = typer.Option(Path("explain-out"), "--out", help="Output directory for X.npy and X.png."),
        low: float = typer.Option(None, "--low", help="z^B lower input bound (default: the batch minimum)."),
        high: float = typer.Option(None, "--high", help="z^B upper input bound (default: the batch maximum)."),
        overlay: bool = typer.Option(False, "--overlay", help="Blend the heatmap over the input image."),
        layer: str = typer.Option(None, "--layer", help="Read relevance at this layer's output instead."),
        device: str = typer.Option("auto", "--device", help="'auto', 'cpu' or 'cuda'."),
        list_methods_: bool = typer.Option(False, "--list-methods", help="List the attribution methods and exit."),
    ) -> None:
        """Explain a model's predictions: write relevance (X.npy, float32) and a heatmap (X.png) per input X."""
        from semlens.explain import list_methods

        if list_methods_:
            for name, desc in list_methods().items():
                typer.echo(f"{name:28s} {desc}")
            return
        with user_errors():
            import torch

            from semlens.checkpoint import load_weights, read_config
            from semlens.explain import Attributor
            from semlens.models import build_model
            from semlens.runtime import progress, resolve_device

            files = list(input_ or []) + list(inputs or [])
            if not model:
                raise ValueError("--model is required (a built-in name or package.module:factory)")
            if not files:
                raise ValueError("no input given: pass --input PATH (image or .npy)")
            if method not in list_methods():
                raise ValueError(f"unknown method {method!r}; run `semlens explain --list-methods`")
            if target != "pred" and not target.lstrip("-").isdigit():
                raise ValueError(f"--target must be a class index or 'pred', got {target!r}")
            kwargs = {}
            if weights is not None and weights.suffix == ".safetensors":
                kwargs = dict(read_config(weights).get("model_kwargs", {}))
            net = build_model(model, **kwargs)
            if weights is not None:
                load_weights(net, weights)
            dev = resolve_device(device)
            net = net.to(dev)
            loaded = [(f, *load_input(f)) for f in files]
            out.mkdir(parents=True, exist_ok=True)
            with Attributor(net, method, low=low, high=high) as attr:
                for path, x, single in progress(loaded, total=len(loaded), desc=f"explain ({method})"):
                    x = x.to(dev)
                    if target == "pred":
                        with torch.no_grad():
                            tgt = net(x).argmax(1)
                    else:
                        tgt = int(target)
                    try:
                        rel = attr(x, tgt, layer=layer, low=low, high=high)
                    except ValueError as err:
                        raise type(err)(f"{path}: {err}") from err
                    rel_np = rel.float().cpu().numpy()
                    import numpy as np

                    np.save(out / f"{path.stem}.npy", rel_np[0] if single else rel_np)
                    _write_png(out / f"{path.stem}.png", rel_np, x.cpu().numpy(), overlay)
                    shown = tgt if isinstance(tgt, int) else tgt.tolist()
                    typer.echo(f"{path.name}: target {shown} -> {out / (path.stem + '.npy')}, "
                               f"{out / (path.stem + '.png')}")
