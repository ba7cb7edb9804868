"""Captioner benchmarks: training throughput (clips/s) and PDM time for all neurons over a test set --
closed form for the softmax-linear f, batched masking, and a per-neuron Python loop -- compared with one
forward pass of the captioner's encoder (+ f) over the same set.

    python benchmarks/bench_caption.py [--quick] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse

import torch

from _timing import median_time  # noqa: E402
from semlens.captioning.model import AttentiveCaptioner, CaptionerConfig, Vocabulary
from semlens.captioning.naming import LinearTopicMap, name_neurons
from semlens.captioning.training import CaptionData, CaptionTrainConfig, CaptionTrainer, mean_representations
from semlens.runtime import resolve_device


def timed(fn, repeats: int, device: torch.device) -> float:
    return median_time(fn, repeats, device, warmup=1)


def synthetic(n: int, T: int, F: int, vocab: Vocabulary, K: int, seed: int) -> CaptionData:
    g = torch.Generator().manual_seed(seed)
    words = vocab.words[4:]
    feats = [torch.randn(T, F, generator=g) for _ in range(n)]
    caps = [[" ".join(words[i] for i in torch.randint(0, len(words), (8,), generator=g)) for _ in range(5)]
            for _ in range(n)]
    s = torch.softmax(torch.randn(n, K, generator=g), -1)
    return CaptionData(feats, caps, vocab, s, max_len=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    n_train, n_test, T, F, hidden, K = (64, 64, 8, 64, 64, 8) if args.quick else (512, 670, 16, 256, 256, 20)
    repeats = 3 if args.quick else 5
    vocab = Vocabulary([f"w{i}" for i in range(300)])
    train = synthetic(n_train, T, F, vocab, K, 0)
    test = synthetic(n_test, T, F, vocab, K, 1)
    torch.manual_seed(0)
    cfg = CaptionerConfig(feature_dim=F, vocab=vocab.words, n_topics=K, hidden=hidden, embed=hidden,
                          decoder_hidden=hidden, attention=hidden // 2, dropout=0.5, max_len=10)
    model = AttentiveCaptioner(cfg)
    print(f"device {dev}; train {n_train} videos x 5 captions, test {n_test} videos, T={T}, F={F}, D={2 * hidden}")

    tr = CaptionTrainer(model, train, CaptionTrainConfig(epochs=1, batch_size=64, lam=1.0, device=str(dev)))
    t_epoch = timed(tr.fit, repeats, dev)  # one epoch per fit (the trainer starts afresh without a checkpoint)
    print(f"training: {train.n_pairs / t_epoch:.1f} clips/s (caption pairs, batch 64; median of {repeats} epochs)")

    model.eval()
    vbar = mean_representations(model, test).to(dev)
    f = LinearTopicMap.from_linear(model.topic_head, softmax=True)

    def forward() -> None:
        with torch.no_grad():
            f(mean_representations(model, test).to(dev))

    def pdm_loop() -> None:  # baseline: one masked copy per neuron, in Python
        with torch.no_grad():
            P = f(vbar)
            for j in range(vbar.shape[1]):
                vb = vbar.clone()
                vb[:, j] = 0
                (P - f(vb)).mean(0)

    closed = name_neurons(f, vbar, method="closed").differences
    masked = name_neurons(f, vbar, method="masking").differences
    err = float((closed - masked).abs().max())
    t_fwd = timed(forward, repeats, dev)
    t_closed = timed(lambda: name_neurons(f, vbar, method="closed"), repeats, dev)
    t_mask = timed(lambda: name_neurons(f, vbar, method="masking"), repeats, dev)
    t_loop = timed(pdm_loop, repeats, dev)
    D = vbar.shape[1]
    print(f"one encoder forward (+ f) over the test set: {t_fwd * 1e3:.1f} ms (median)")
    print(f"PDM, all {D} neurons x {n_test} videos, closed form: {t_closed * 1e3:.2f} ms  "
          f"ratio to forward {t_closed / t_fwd:.3f}x")
    print(f"PDM, batched masking:                    {t_mask * 1e3:.1f} ms  ratio to forward {t_mask / t_fwd:.2f}x  "
          f"(closed form {t_mask / t_closed:.0f}x faster; max |difference| {err:.1e})")
    print(f"PDM, per-neuron Python loop:             {t_loop * 1e3:.1f} ms  ratio to forward {t_loop / t_fwd:.2f}x")


if __name__ == "__main__":
    main()
