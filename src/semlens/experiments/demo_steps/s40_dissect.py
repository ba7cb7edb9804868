"""Demo step: Network Dissection of the demo classifier, and a tiny block-norm vs weight-decay comparison."""

from __future__ import annotations

import time

from semlens.experiments.demo import DemoContext
from semlens.report import Section

#: reduced comparison (the full run: ``semlens reproduce blocknorm``)
FAST = {"seeds": 1, "epochs": 2, "n_train": 500, "n_test": 200, "n_dissect": 150}


def run(ctx: DemoContext) -> list[Section]:
    from semlens.experiments.blocknorm import BlockNormConfig, blocknorm_sections, run_blocknorm
    from semlens.units.dissect import dissect
    from semlens.units.dissect_report import dissection_sections
    from semlens.world import BrodenDataset

    model = ctx.artifacts["classifier"]
    ds = BrodenDataset(ctx.artifacts["concepts_dir"])
    t0 = time.perf_counter()
    result = dissect(model, ds, model.conv_layers, batch_size=100, device=ctx.device)
    elapsed = time.perf_counter() - t0
    paths = result.save(ctx.path("dissect", "classifier"))
    ctx.artifacts["dissection_units"] = paths["units"]
    sections = dissection_sections(result, model, ds, title="Network Dissection of the demo classifier", cards=4)
    sections[0].text(f"Dissection of {len(model.conv_layers)} conv layers over {len(ds)} images took {elapsed:.1f} s "
                     f"on {ctx.device}; units.csv / layers.csv are in dissect/classifier/.")
    cfg = BlockNormConfig.fast(device=str(ctx.device), data_seed=ctx.seed + 500, **FAST)
    results = run_blocknorm(ctx.path("dissect", "blocknorm"), cfg, sweep=False)
    bn = blocknorm_sections(results, title="Block norm vs weight decay (tiny demo run)")
    bn[0].text("Tiny run (1 seed, 2 epochs, 500 images) to show the pipeline; the full run is "
               "`semlens reproduce blocknorm` (its numbers are in docs/dissection.md).")
    return sections + bn[:1]
