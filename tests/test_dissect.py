"""Network Dissection: exact IoU on hand-made data, loop/float64 reference, quantiles, bad input, state."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from torch import nn

from _dissect_helpers import LABELS, random_dataset, reference_iou, tiny_net
from semlens.layers import UnknownLayerError, count_hooks
from semlens.units import DissectionError, Dissector, TensorSegmentationDataset, dissect
from semlens.units.quantile import ExactTopQuantile, HistogramQuantileSketch
from semlens.units.segmentation import _check_images


def _hand_made(n: int = 8, size: int = 16, side: int = 5):
    """Channel k of each image is 1 + noise inside a side×side square of concept k+1, noise < 0 elsewhere."""
    g = torch.Generator().manual_seed(0)
    images = -torch.rand(n, 3, size, size, generator=g)
    masks = torch.zeros(n, 3, size, size, dtype=torch.long)
    for i in range(n):
        for k in range(3):
            y, x = torch.randint(0, size - side + 1, (2,), generator=g).tolist()
            images[i, k, y:y + side, x:x + side] = 1 + torch.rand(side, side, generator=g)
            masks[i, k, y:y + side, x:x + side] = k + 1
    labels = [(1, "square", "object"), (2, "disc", "object"), (3, "stripe", "object"), (4, "unused", "object")]
    return images, masks, labels


def test_unit_built_to_fire_on_a_concept_finds_it_with_iou_one():
    images, masks, labels = _hand_made()
    net = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(3)[[2, 0, 1]].view(3, 3, 1, 1))  # unit u sees channel perm[u]
    ds = TensorSegmentationDataset(images, labels, pixel={"object": masks})
    q = 25 / 256  # each concept covers exactly 25 of 256 pixels per image
    res = dissect(net, ds, "0", quantile=q, batch_size=3, device="cpu")
    d = res.layers["0"]
    assert [res.concept_names[c] for c in d.best_concept.tolist()] == ["stripe", "square", "disc"]
    torch.testing.assert_close(d.best_iou, torch.ones(3, dtype=torch.float64))
    assert res.unique_detectors("0") == {"object": 3, "total": 3}


def test_iou_and_unique_detectors_match_loop_reference_exactly():
    net, ds = tiny_net(), random_dataset()
    res = dissect(net, ds, ["0", "2"], quantile=0.05, iou_threshold=0.02, batch_size=4, device="cpu")
    for name in ("0", "2"):
        d = res.layers[name]
        ref = reference_iou(net, ds, name, d.thresholds, (8, 8))
        np.testing.assert_array_equal(d.iou.numpy(), ref)
        best = ref.argmax(1)
        np.testing.assert_array_equal(d.best_concept.numpy(), best)
        detectors = ref[np.arange(len(best)), best] > 0.02
        concepts = {int(c) for c in best[detectors]}
        expected = {cat: sum(1 for c in concepts if LABELS[c][2] == cat) for cat in ds.categories}
        assert res.unique_detectors(name) == {**expected, "total": len(concepts)}
    assert res.total_unique_detectors() == sum(res.unique_detectors(n)["total"] for n in ("0", "2"))


def test_thresholds_equal_numpy_quantile_and_results_do_not_depend_on_batching_or_cache():
    net, ds = tiny_net(), random_dataset(n=7)
    a = dissect(net, ds, ["0", "2"], quantile=0.05, batch_size=3, device="cpu")
    b = dissect(net, ds, ["0", "2"], quantile=0.05, batch_size=2, device="cpu", cache_bytes=0)
    acts = {}
    hooks = [net[i].register_forward_hook(lambda m, i, o, k=str(i): acts.__setitem__(k, o.detach())) for i in (0, 2)]
    with torch.no_grad():
        net(ds.images)
    for h in hooks:
        h.remove()
    for name in ("0", "2"):
        values = acts[name].double().transpose(0, 1).reshape(acts[name].shape[1], -1).numpy()
        np.testing.assert_allclose(a.layers[name].thresholds.numpy(), np.quantile(values, 0.95, axis=1), rtol=1e-6)
        torch.testing.assert_close(a.layers[name].thresholds, b.layers[name].thresholds, rtol=0, atol=0)
        assert torch.equal(a.layers[name].intersection, b.layers[name].intersection)
        assert torch.equal(a.layers[name].top_images, b.layers[name].top_images)
        # top image of each unit is the image with the largest spatial maximum
        assert torch.equal(a.layers[name].top_images[:, 0], acts[name].amax((2, 3)).argmax(0))


@pytest.mark.parametrize("bits", [3, 6])
def test_quantile_sketch_within_documented_bound(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.cat([torch.randn(5, 3000, generator=g) * torch.tensor([[1e-3], [1.0], [30.0], [1.0], [1.0]]),
                   torch.rand(5, 1000, generator=g) * 4 - 3], dim=1)
    x[3] = -x[3].abs()  # an all-negative unit
    x[4, :2000] = 0.0  # many ties at zero
    for q in (0.005, 0.2, 0.9):
        exact = ExactTopQuantile(5, x.shape[1], q)
        sketch = HistogramQuantileSketch(5, x.shape[1], q, mantissa_bits=bits)
        for chunk in x.split(700, dim=1):
            exact.update(chunk)
            sketch.update(chunk)
        t = torch.from_numpy(np.quantile(x.double().numpy(), 1 - q, axis=1))
        torch.testing.assert_close(exact.result().double(), t, rtol=1e-6, atol=0)
        srt = x.double().sort(dim=1).values
        lo = exact.lo
        bound = 2.0 ** -(bits + 1) * torch.maximum(srt[:, lo].abs(), srt[:, min(lo + 1, x.shape[1] - 1)].abs())
        err = (sketch.result().double() - t).abs()
        assert (err <= bound + 1e-30).all(), (q, err, bound)


def test_dissect_with_sketch_thresholds_stays_within_bound():
    net, ds = tiny_net(), random_dataset()
    exact = dissect(net, ds, "2", quantile=0.05, device="cpu")
    sketch = dissect(net, ds, "2", quantile=0.05, device="cpu", quantile_memory=0)
    assert exact.exact_thresholds == {"2": True} and sketch.exact_thresholds == {"2": False}
    t, s = exact.layers["2"].thresholds, sketch.layers["2"].thresholds
    assert ((t - s).abs() <= 2.0**-7 * t.abs() * 1.5 + 1e-30).all()


class _OddSizes(TensorSegmentationDataset):
    def load_batch(self, indices):
        b = super().load_batch(indices)
        if 3 in indices:
            b.images = b.images[..., :-2, :-2]
        return b


def test_bad_input_errors_name_the_culprit():
    net, ds = tiny_net(), random_dataset()
    with pytest.raises(UnknownLayerError, match="'conv9'"):
        dissect(net, ds, "conv9", device="cpu")
    with pytest.raises(DissectionError, match="'6'.*not a spatial map"):
        dissect(net, ds, "6", device="cpu")
    with pytest.raises(DissectionError, match="no masks for category.*material"):
        dissect(net, ds, "2", categories=["material"], device="cpu")
    with pytest.raises(DissectionError, match="workers must be >= 1, got 0"):
        dissect(net, ds, "2", device="cpu", workers=0)
    sparse = random_dataset()
    sparse.annotated["object"][:] = False
    with pytest.raises(DissectionError, match="no masks for category.*object"):
        dissect(net, sparse, "2", categories=["object", "color"], device="cpu")
    odd = _OddSizes(ds.images, LABELS, pixel=ds.pixel, image_level=ds.image_level)
    with pytest.raises(DissectionError, match="mismatched image size"):
        dissect(net, odd, "2", batch_size=2, device="cpu")
    masks = random_dataset(seg=6)
    with pytest.raises(DissectionError, match="mismatched mask size"):
        dissect(net, masks, "2", seg_size=(8, 8), device="cpu")
    nan = random_dataset()
    nan.images[2, 0, 0, 0] = float("nan")
    with pytest.raises(DissectionError, match="NaN"):
        dissect(net, nan, "2", device="cpu")
    inf = random_dataset()
    inf.images[1, 0, 1, 1] = float("-inf")
    with pytest.raises(DissectionError, match="NaN or Inf"):
        dissect(net, inf, "2", device="cpu")
    huge = random_dataset()  # finite values whose sum overflows float32: valid input, no error
    huge.images[0] = 3e38
    _check_images(huge.images, None, list(range(len(huge.images))))
    with pytest.raises(DissectionError, match="cannot process images"):
        dissect(net, random_dataset(size=4), "2", device="cpu")
    with pytest.raises(DissectionError, match="quantile"):
        dissect(net, ds, "2", quantile=1.5, device="cpu")


def test_model_state_and_hooks_restored_on_success_and_error():
    net, ds = tiny_net(), random_dataset()
    net.train()
    net[0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in net.parameters()]
    est = Dissector("0,2", quantile=0.05, device="cpu").fit(net, ds)
    assert set(est.result_.layers) == {"0", "2"}
    assert est.get_params()["quantile"] == 0.05 and est.get_params()["layers"] == "0,2"
    assert est.set_params(top_n=3).top_n == 3
    with pytest.raises(ValueError, match="no parameter 'quantil'; valid: layers, quantile"):
        est.set_params(quantil=0.1)
    with pytest.raises(DissectionError):
        dissect(net, random_dataset(seg=6), "2", seg_size=(8, 8), device="cpu")
    assert net.training and all(m.training for m in net.modules())
    assert [p.requires_grad for p in net.parameters()] == flags
    assert count_hooks(net) == 0


def test_save_writes_units_and_layers_csv(tmp_path):
    net, ds = tiny_net(), random_dataset()
    res = dissect(net, ds, ["0", "2"], quantile=0.05, device="cpu")
    paths = res.save(tmp_path)
    units = paths["units"].read_text().splitlines()
    assert units[0] == "layer,unit,concept,category,iou,threshold" and len(units) == 1 + 4 + 5
    layers = paths["layers"].read_text().splitlines()
    assert layers[0].startswith("layer,units,detectors,unique_detectors,color,object,scene")
    assert len(layers) == 3


def test_report_sections_with_bar_chart_and_unit_cards(tmp_path):
    from semlens.report import Report
    from semlens.units.dissect_report import best_units, dissection_sections

    net, ds = tiny_net(), random_dataset()
    res = dissect(net, ds, ["0", "2"], quantile=0.05, device="cpu", top_n=3)
    assert best_units(res, 3)[0] == max(((n, u) for n in res.layers for u in range(res.layers[n].units)),
                                        key=lambda nu: float(res.layers[nu[0]].best_iou[nu[1]]))
    sections = dissection_sections(res, net, ds, cards=3, images=3)
    assert len(sections) == 2 and all("data:image/png" in "".join(s.blocks) for s in sections)
    html = Report(sections=sections).write(tmp_path / "r.html").read_text()
    assert "unit cards" in html


def test_layers_of_equal_map_size_are_grouped_without_changing_any_count():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(3, 5, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    ds = random_dataset(n=9)
    both = dissect(net, ds, ["0", "2", "4"], quantile=0.05, batch_size=4, device="cpu")
    for name in ("0", "2", "4"):  # "0" and "2" (12x12) share a group
        alone = dissect(net, ds, name, quantile=0.05, batch_size=4, device="cpu")
        assert torch.equal(both.layers[name].thresholds, alone.layers[name].thresholds)
        assert torch.equal(both.layers[name].intersection, alone.layers[name].intersection)
        assert torch.equal(both.layers[name].activation, alone.layers[name].activation)
        ref = reference_iou(net, ds, name, both.layers[name].thresholds, (8, 8))
        np.testing.assert_array_equal(both.layers[name].iou.numpy(), ref)


def test_layer_groups_tallied_in_threads_give_the_one_thread_counts():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    ds = random_dataset(n=9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dissect(net, ds, ["0", "2"], quantile=0.05, batch_size=4, device="cpu")
        torch.set_num_threads(2)  # two layer groups (12x12, 5x5) -> a pool of two tally threads
        two = dissect(net, ds, ["0", "2"], quantile=0.05, batch_size=4, device="cpu")
    finally:
        torch.set_num_threads(threads)
    for name in ("0", "2"):
        assert torch.equal(one.layers[name].intersection, two.layers[name].intersection)
        assert torch.equal(one.layers[name].activation, two.layers[name].activation)
        assert torch.equal(one.layers[name].iou, two.layers[name].iou)


def test_concepts_repeated_across_categories_and_whole_image_labels_count_once():
    g = torch.Generator().manual_seed(4)
    n, seg = 6, 8
    images = torch.rand(n, 3, 12, 12, generator=g)
    color = torch.randint(0, 4, (n, 2, seg, seg), generator=g)
    obj = torch.tensor([0, 4, 5, 1, 6])[torch.randint(0, 5, (n, 1, seg, seg), generator=g)]  # 1: a colour, 6: a scene
    scene = torch.tensor([0, 6, 7])[torch.randint(0, 3, (n, 1), generator=g)]
    ds = TensorSegmentationDataset(images, LABELS, pixel={"color": color, "object": obj}, image_level={"scene": scene})
    net = tiny_net()
    res = dissect(net, ds, ["0", "2"], quantile=0.1, batch_size=4, device="cpu")
    streamed = dissect(net, ds, ["0", "2"], quantile=0.1, batch_size=5, device="cpu", cache_bytes=0)
    for name in ("0", "2"):
        ref = reference_iou(net, ds, name, res.layers[name].thresholds, (seg, seg))
        np.testing.assert_array_equal(res.layers[name].iou.numpy(), ref)
        assert torch.equal(res.layers[name].intersection, streamed.layers[name].intersection)


@pytest.mark.parametrize("size,seg", [((5, 5), (8, 8)), ((7, 4), (16, 13)), ((16, 16), (6, 6)), ((3, 9), (3, 9))])
def test_sparse_upsampler_finds_exactly_the_pixels_above_threshold(size, seg):
    from _dissect_helpers import reference_upsample
    from semlens.units.upsample import _SparseUpsampler

    g = torch.Generator().manual_seed(size[0] * 31 + seg[1])
    acts = torch.randn(3, 4, *size, generator=g)
    acts[0, 1] = 0.5  # a flat map exactly at its threshold: nothing is above it
    thresholds = acts.transpose(0, 1).reshape(4, -1).quantile(0.8, dim=1)
    thresholds[1] = 0.5
    up = reference_upsample(acts, seg) > thresholds.double().numpy().reshape(1, -1, 1, 1)
    expected = sorted(zip(*(t.tolist() for t in np.nonzero(up.reshape(3, 4, -1))), strict=True))
    upsampler = _SparseUpsampler(size[0], size[1], seg, torch.device("cpu"))
    for bound in (thresholds, thresholds - 0.7):  # a table built with a lower bound holds more blocks
        table = upsampler.block_table(acts, bound)
        got = [t for chunk in upsampler.active_pixels(*table, thresholds, max_elements=50)
               for t in zip(*(c.tolist() for c in chunk), strict=True)]
        assert sorted(got) == expected


def test_torch_only_path_used_on_cuda_gives_identical_results():
    from semlens.units.backend import Backend

    net, ds = tiny_net(), random_dataset(n=9)
    fast = dissect(net, ds, ["0", "2"], quantile=0.05, batch_size=4, device="cpu")
    assert Backend.for_device("cuda") == Backend(numpy=False, fused=False)  # what a CUDA device gets
    plain = dissect(net, ds, ["0", "2"], quantile=0.05, batch_size=4, device="cpu", backend=Backend.for_device("cuda"))
    for name in ("0", "2"):
        assert torch.equal(fast.layers[name].thresholds, plain.layers[name].thresholds)
        assert torch.equal(fast.layers[name].intersection, plain.layers[name].intersection)
        assert torch.equal(fast.layers[name].activation, plain.layers[name].activation)


def test_cache_pruned_with_risen_bounds_still_needs_one_forward_and_gives_the_streamed_counts(monkeypatch):
    import importlib

    mod = importlib.import_module("semlens.units.dissect")
    net, ds = tiny_net(), random_dataset(n=40, size=24, seg=16)
    load, calls, prunes = ds.load_batch, [], []
    monkeypatch.setattr(ds, "load_batch", lambda idx: calls.append(1) or load(idx))
    prune = mod._prune_cache
    monkeypatch.setattr(mod, "_prune_cache", lambda c, b, be: prunes.append(1) or prune(c, b, be))
    cached = dissect(net, ds, ["0", "2"], quantile=0.02, batch_size=2, device="cpu", cache_bytes=100_000,
                     workers=1)  # one worker's bounds (two workers see half the data each: looser bounds)
    assert prunes and len(calls) == 1 + 20  # probe + one forward per batch: the pruned cache fitted
    streamed = dissect(net, ds, ["0", "2"], quantile=0.02, batch_size=2, device="cpu", cache_bytes=0)
    for name in ("0", "2"):
        assert torch.equal(cached.layers[name].intersection, streamed.layers[name].intersection)
        assert torch.equal(cached.layers[name].activation, streamed.layers[name].activation)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "tensor path"])
def test_batches_on_several_workers_give_the_one_worker_result_exactly(fused):
    """Workers see different batches in any order (own estimators, tallies, cache entries), folded after each
    pass: thresholds, counts, IoUs and top images (ties broken by index: a dead unit ties everywhere) equal
    one worker's, and the intra-op thread count is restored."""
    from semlens.units.backend import Backend

    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        net[2].weight[0] = 0.0  # unit 0 of layer "3" is dead: its spatial maximum (the bias) ties on every image
        net[2].bias[0] = -1.0
    ds = random_dataset(n=23)
    threads = torch.get_num_threads()
    runs = {w: dissect(net, ds, ["1", "3"], quantile=0.05, batch_size=2, device="cpu", workers=w, top_n=4,
                       show_progress=False, backend=Backend(fused=fused)) for w in (1, 2, 3)}
    assert torch.get_num_threads() == threads
    for w in (2, 3):
        for name in ("1", "3"):
            a, b = runs[1].layers[name], runs[w].layers[name]
            for field in ("thresholds", "intersection", "activation", "iou", "top_images", "top_values"):
                assert torch.equal(getattr(a, field), getattr(b, field)), (w, name, field)
    assert runs[2].layers["3"].top_images[0].tolist() == [0, 1, 2, 3]  # ties: the smallest indices
    ref = reference_iou(net, ds, "3", runs[2].layers["3"].thresholds, (8, 8))
    np.testing.assert_array_equal(runs[2].layers["3"].iou.numpy(), ref)


def test_an_error_on_a_worker_is_raised_and_restores_everything():
    net, ds = tiny_net(), random_dataset(n=12)
    load = ds.load_batch

    def failing(idx):
        if 7 in idx:
            raise OSError("disk gone at image 7")
        return load(idx)

    ds.load_batch = failing
    threads = torch.get_num_threads()
    net.train()
    with pytest.raises(OSError, match="image 7"):
        dissect(net, ds, ["0", "2"], quantile=0.05, batch_size=2, device="cpu", workers=2, show_progress=False)
    assert torch.get_num_threads() == threads and net.training and count_hooks(net) == 0


def test_workers_are_fewer_when_their_estimators_would_not_fit_in_quantile_memory(monkeypatch):
    mod = importlib.import_module("semlens.units.dissect")
    used = []
    run = mod.run_batches
    monkeypatch.setattr(mod, "run_batches", lambda *a, **kw: used.append(kw["workers"]) or run(*a, **kw))
    net, ds = tiny_net(), random_dataset(n=12)
    ests = [mod.make_quantile_estimator(c, 12 * hw, 0.05, "cpu", 1 << 28) for c, hw in ((4, 25), (5, 9))]
    one = sum(e.max_bytes for e in ests)  # exact estimators of both layers for one worker
    dissect(net, ds, ["0", "2"], quantile=0.05, batch_size=2, device="cpu", workers=4, quantile_memory=2 * one)
    dissect(net, ds, ["0", "2"], quantile=0.05, batch_size=2, device="cpu", workers=4, quantile_memory=100 * one)
    assert used == [2, 2, 4, 4]  # both passes: two workers' estimators fit, then all four
