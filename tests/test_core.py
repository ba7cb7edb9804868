"""Shared core: layer lookup, scoped hooks, state restoration, checkpoints, sharding, report."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from semlens.checkpoint import CheckpointError, load_weights, read_config, save_weights
from semlens.distributed import shard_indices
from semlens.layers import (
    UnknownLayerError,
    capture_activations,
    count_hooks,
    frozen,
    get_module,
    patch_activations,
)
from semlens.models import ModelSpecError, build_model
from semlens.report import Report, Section


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 3)))


def test_get_module_finds_nested_and_suggests_close_names():
    net = _net()
    assert get_module(net, "2.0") is net[2][0]
    assert get_module(net, "") is net
    with pytest.raises(UnknownLayerError, match=r"'2\.1'.*Did you mean"):
        get_module(net, "2.1")


def test_capture_records_outputs_and_removes_hooks():
    net = _net()
    x = torch.randn(5, 4)
    with capture_activations(net, "0,2.0") as acts:
        y = net(x)
        assert count_hooks(net) == 2
    assert count_hooks(net) == 0
    torch.testing.assert_close(acts["2.0"], y)
    torch.testing.assert_close(acts["0"], net[0](x))


def test_patch_replaces_output_and_cleans_up_after_exception():
    net = _net()
    x = torch.randn(2, 4)
    with patch_activations(net, {"1": torch.zeros_like}):
        y = net(x)
    torch.testing.assert_close(y, net[2][0].bias.expand(2, 3))
    with pytest.raises(RuntimeError, match="boom"):
        with patch_activations(net, {"1": torch.zeros_like}):
            raise RuntimeError("boom")
    assert count_hooks(net) == 0


def test_frozen_restores_mode_and_requires_grad_on_exception():
    net = _net()
    net.train()
    net[0].weight.requires_grad_(False)
    before = [(p.requires_grad) for p in net.parameters()]
    with pytest.raises(ValueError):
        with frozen(net):
            assert not net.training and not any(p.requires_grad for p in net.parameters())
            raise ValueError("inside")
    assert net.training and all(m.training for m in net.modules())
    assert [p.requires_grad for p in net.parameters()] == before


def test_checkpoint_round_trip_with_config(tmp_path):
    net = _net()
    path = save_weights(net, tmp_path / "m.safetensors", config={"arch": "mlp", "width": 8})
    other = _net()
    for p in other.parameters():
        nn.init.zeros_(p)
    load_weights(other, path)
    for a, b in zip(net.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert read_config(path) == {"arch": "mlp", "width": 8}


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(_net(), tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_weights(_net(), bad)
    wrong = save_weights(nn.Linear(4, 2), tmp_path / "wrong.safetensors")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_weights(_net(), wrong)


def test_torch_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_weights(_net(), path)


def test_model_spec_from_user_module(tmp_path, monkeypatch):
    (tmp_path / "usermodels.py").write_text(
        "import torch.nn as nn\ndef make(width=3):\n    return nn.Linear(2, width)\ndef notmodel():\n    return 1\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_model("usermodels:make", width=5).out_features == 5
    with pytest.raises(ModelSpecError, match="not a torch.nn.Module"):
        build_model("usermodels:notmodel")
    with pytest.raises(ModelSpecError, match="unknown model"):
        build_model("no-such-model")
    with pytest.raises(ModelSpecError, match="cannot import"):
        build_model("no_such_package.mod:make")


def test_model_spec_from_the_working_directory_leaves_sys_path_alone(tmp_path, monkeypatch):
    """A module in the working directory is found without PYTHONPATH, its factory may import a sibling module when
    called, and sys.path is the same afterwards (semlens patches no global state)."""
    (tmp_path / "cwd_models_a.py").write_text("def make():\n    from cwd_models_b import build\n    return build()\n")
    (tmp_path / "cwd_models_b.py").write_text("import torch.nn as nn\ndef build():\n    return nn.Linear(2, 7)\n")
    monkeypatch.chdir(tmp_path)
    before = list(__import__("sys").path)
    assert build_model("cwd_models_a:make").out_features == 7
    assert __import__("sys").path == before



@pytest.mark.parametrize("n,w", [(10, 3), (2, 2), (7, 1), (1, 4)])
def test_shards_partition_the_range(n, w):
    parts = [list(shard_indices(n, r, w)) for r in range(w)]
    assert sum(parts, []) == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_report_embeds_figures_and_tables(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    rep = Report(title="t")
    rep.add(Section("A <section>").text("x < y").table([{"a": 1.23456, "b": "z"}]).figure(fig, caption="c"))
    html = rep.write(tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in html
    assert "1.235" in html and "A &lt;section&gt;" in html and "x &lt; y" in html
