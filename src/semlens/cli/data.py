"""``semlens data``: write the built-in worlds to disk (Broden-format concept images, MSVD-style clips)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from semlens.cli._common import user_errors


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Generate built-in datasets with exact ground truth.", no_args_is_help=True)
    app.add_typer(data_app, name="data")

    @data_app.command("concepts")
    def concepts(
        out: Path = typer.Option(..., help="Output directory (Broden format)."),
        n: int = typer.Option(10000, help="Number of images."),
        size: int = typer.Option(64, help="Image side in pixels (16..512)."),
        seed: int = typer.Option(0, help="Random seed (same seed => byte-identical files)."),
        noise: float = typer.Option(0.04, help="Std of the Gaussian pixel noise."),
        val_fraction: float = typer.Option(0.3, help="Share of images in split 'val' (the rest: 'train')."),
        workers: int = typer.Option(0, help="Worker processes (0 = all cores)."),
        overwrite: bool = typer.Option(False, help="Write into a non-empty OUT that semlens did not create."),
    ) -> None:
        """Write N concept images with colour/object/part/texture masks, scene labels, class labels and
        evidence masks as a Broden-format dataset."""
        from semlens.outputs import OutputDir
        from semlens.world import write_concepts

        with user_errors(), OutputDir(out, overwrite=overwrite):
            t0 = time.perf_counter()
            write_concepts(out, n=n, size=size, seed=seed, noise=noise, val_fraction=val_fraction,
                           workers=workers or None)
            typer.echo(f"wrote {n} images to {out} in {time.perf_counter() - t0:.1f}s")

    @data_app.command("clips")
    def clips(
        out: Path = typer.Option(..., help="Output directory (MSVD-style corpus)."),
        n: int = typer.Option(300, help="Number of clips."),
        frames: int = typer.Option(16, help="Frames per clip."),
        size: int = typer.Option(64, help="Frame side in pixels."),
        seed: int = typer.Option(0, help="Random seed."),
        captions: int = typer.Option(20, help="Captions per clip."),
        encoder: str = typer.Option(None, help="Optional frame encoder weights (.safetensors written by "
                                               "'semlens train'): write per-frame features from its penultimate "
                                               "layer to features/ instead of raw frames."),
        frame_layers: str = typer.Option(None, help="With --encoder: comma-separated layers whose outputs make the "
                                         "descriptor (default: the input of the last Linear layer). `reproduce dong`"
                                         " uses features.conv2,features.conv5 --pool meanmax --grid 2 "
                                         "--grid-layers features.conv5."),
        pool: str = typer.Option("mean", help="With --frame-layers: 'mean' or 'meanmax' over space."),
        grid: int = typer.Option(0, help="With --frame-layers: also a grid x grid average-pooled layout (0: none)."),
        grid_layers: str = typer.Option(None, help="With --grid: the layers that get it (default: all)."),
        device: str = typer.Option("auto", help="'auto', 'cpu' or 'cuda' (for --encoder)."),
        overwrite: bool = typer.Option(False, help="Write into a non-empty OUT that semlens did not create."),
    ) -> None:
        """Write N captioned clips: captions.csv, splits/*.txt, truth.csv, frames/ (and features/ with --encoder)."""
        if encoder is None and (frame_layers or grid or grid_layers or pool != "mean"):
            raise typer.BadParameter("--frame-layers, --pool, --grid and --grid-layers describe --encoder's "
                                     "features: give --encoder too")
        from semlens.outputs import OutputDir
        from semlens.world import generate_clips, write_clip_corpus

        with user_errors(), OutputDir(out, inputs=[encoder] if encoder else [], overwrite=overwrite):
            t0 = time.perf_counter()
            cs = generate_clips(n=n, frames=frames, size=size, seed=seed, captions_per_clip=captions)
            feats = None
            if encoder is not None:
                import torch

                from semlens.captioning.features import encode_frames, extract_frame_features, load_trained
                from semlens.runtime import resolve_device

                dev = resolve_device(device)
                cnn = load_trained(encoder).to(dev)
                if frame_layers:
                    feats = extract_frame_features(
                        cnn, torch.as_tensor(cs.frames), layer=[s.strip() for s in frame_layers.split(",")], device=dev,
                        pool=pool, grid=grid, grid_layers=[s.strip() for s in grid_layers.split(",")] if grid_layers
                        else None)
                else:
                    feats = encode_frames(cnn, cs.frames, device=dev)
            write_clip_corpus(cs, out, features=feats, write_frames=True)
            typer.echo(f"wrote {n} clips to {out} in {time.perf_counter() - t0:.1f}s")
