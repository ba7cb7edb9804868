"""Network Dissection: exact IoU on hand-made data, loop/float64 reference, quantiles, bad input, state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from _dissect_helpers import LABELS, random_dataset, reference_iou, tiny_net
from semlens.layers import UnknownLayerError, count_hooks
from semlens.units import DissectionError, Dissector, TensorSegmentationDataset, dissect
from semlens.units.quantile import ExactTopQuantile, HistogramQuantileSketch


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
