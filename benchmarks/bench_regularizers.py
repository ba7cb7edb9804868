"""Training-step cost of the regularizers: step time with each term ÷ plain step (target ≤ 1.15 for block norm).

    python benchmarks/bench_regularizers.py [--quick] [--device cpu|cuda] [--batch-size 64]

One step = forward, cross-entropy (+ term), backward, Adam update, on alexnet-like with 64x64 inputs.
Terms: BlockNorm (p=2, q=1, G=5, all conv layers), WeightDecay (explicit term), and for reference the
activation-group and spatial losses on conv5 (they need captured activations). Medians over steps,
each configuration interleaved with the plain step in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from semlens.layers import capture_activations
from semlens.models import build_model
from semlens.train.regularizers import ActivationGroupLoss, BlockNorm, SpatialLoss, WeightDecay


def step_time(model, opt, x, y, term, device) -> float:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    if term is not None and term.layers:
        with capture_activations(model, term.layers, detach=False) as acts:
            loss = F.cross_entropy(model(x), y) + term(model, acts)
    else:
        loss = F.cross_entropy(model(x), y)
        if term is not None:
            loss = loss + term(model, {})
    loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    dev = torch.device(args.device)
    steps = 10 if args.quick else 30
    torch.manual_seed(0)
    model = build_model("alexnet-like", num_classes=12, image_size=64).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(args.batch_size, 3, 64, 64, device=dev)
    y = torch.randint(0, 12, (args.batch_size,), device=dev)
    last = model.conv_layers[-1]
    terms = {"block norm (p=2,q=1,G=5)": BlockNorm(), "block norm (p=inf,q=2)": BlockNorm(p=float("inf"), q=2),
             "weight decay term": WeightDecay(), "activation group (conv5)": ActivationGroupLoss([last], pairs=30),
             "spatial (conv5)": SpatialLoss([last])}
    for _ in range(3):
        step_time(model, opt, x, y, None, dev)
    print(f"device {dev}, threads {torch.get_num_threads()}, alexnet-like, batch {args.batch_size}, {steps} steps")
    for name, term in terms.items():
        plain, reg = [], []
        for _ in range(steps):
            plain.append(step_time(model, opt, x, y, None, dev))
            reg.append(step_time(model, opt, x, y, term, dev))
        p, r = statistics.median(plain), statistics.median(reg)
        target = "  (target <= 1.15)" if name.startswith("block norm") else ""
        print(f"{name:28s} plain {1e3 * p:7.1f} ms  with term {1e3 * r:7.1f} ms  ratio {r / p:.3f}{target}")


if __name__ == "__main__":
    main()
