"""Library calls leave process-wide state alone: no matplotlib backend switch, no pyplot figure registry."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_report_figures_choose_no_backend_and_import_no_pyplot():
    script = textwrap.dedent(
        """
        import sys
        from types import SimpleNamespace
        import matplotlib
        backend = dict.__getitem__(matplotlib.rcParams, "backend")
        from semlens.report import Section
        from semlens.units.dissect_report import unique_detector_figure
        result = SimpleNamespace(layers={"conv1": 0, "conv2": 0}, categories=["color", "object"], iou_threshold=0.04,
                                 unique_detectors=lambda name: {"color": 2, "object": 1 if name == "conv2" else 0})
        assert "data:image/png" in Section("x").figure(unique_detector_figure(result)).blocks[0]
        from semlens.report import figure_to_data_uri
        uri = figure_to_data_uri(unique_detector_figure(result))
        assert uri.startswith("data:image/png;base64,") and len(uri) > 1000, uri[:80]
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
        assert dict.__getitem__(matplotlib.rcParams, "backend") == backend, "the backend was changed"
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr
