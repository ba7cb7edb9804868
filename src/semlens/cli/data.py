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
        device: str = typer.Option("auto", help="'auto', 'cpu' or 'cuda' (for --encoder)."),
        overwrite: bool = typer.Option(False, help="Write into a non-empty OUT that semlens did not create."),
    ) -> None:
        """Write N captioned clips: captions.csv, splits/*.txt, truth.csv, frames/ (and features/ with --encoder)."""
        from semlens.outputs import OutputDir
        from semlens.world import generate_clips, write_clip_corpus

        with user_errors(), OutputDir(out, inputs=[encoder] if encoder else [], overwrite=overwrite):
            t0 = time.perf_counter()
            cs = generate_clips(n=n, frames=frames, size=size, seed=seed, captions_per_clip=captions)
            feats = None
            if encoder is not None:
                from semlens.captioning.features import encode_frames, load_trained
                from semlens.runtime import resolve_device

                dev = resolve_device(device)
                feats = encode_frames(load_trained(encoder).to(dev), cs.frames, device=dev)
            write_clip_corpus(cs, out, features=feats, write_frames=True)
            typer.echo(f"wrote {n} clips to {out} in {time.perf_counter() - t0:.1f}s")
