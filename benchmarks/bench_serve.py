"""Latency of the web app (`semlens serve`) against a live server on loopback.

Builds a small classifier project (or uses --project/--dissection), starts `semlens serve` as a separate
process, and prints:
- time from process start to the first page (target: within 3 s);
- p50/p95 of a unit card, the same card with its 8 top images once they are cached, the largest layer's unit
  grid (256 units in the built project: its thumbnails are lazy-loaded, so the page is the HTML), a sample page,
  and recording a remark (POST) over --requests requests each (targets: unit card p95 <= 100 ms once its images
  are cached, grid <= 1 s, remark p95 <= 50 ms); the first (uncached) rendering of a card's 8 top images;
- undo after one apply (target <= 1 s);
- the baseline measured in the same run: p50 of the static stylesheet (the server's floor per request),
  and each page's p50 as a ratio to it.

    python benchmarks/bench_serve.py [--requests 200] [--project DIR --dissection DIR]
"""

from __future__ import annotations

import argparse
import csv
import http.client
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path


def _cli(*args: str) -> None:
    env = {**os.environ, "SEMLENS_PROGRESS": "0"}
    subprocess.run([sys.executable, "-m", "semlens", *args], check=True, env=env, stdout=subprocess.DEVNULL)


#: channel width of the grid project's classifier: alexnet-like's conv3 and conv4 get round(96 * 8/3) = 256 units
WIDE = str(8 / 3)


def build_project(root: Path, width: str = "1", layers: str = "all-conv", layer: str = "features.conv5"
                  ) -> tuple[Path, Path]:
    """A classifier project over 300 concept images (32 px): alexnet-like of channel ``width``, ``layers``
    dissected (top images included), unit names of ``layer`` corrected."""
    data, run, diss, proj = root / "data", root / "run", root / "diss", root / "proj"
    if not data.exists():
        _cli("data", "concepts", "--out", str(data), "--n", "300", "--size", "32", "--workers", "1")
    _cli("train", "--data", str(data), "--out", str(run), "--epochs", "2", "--batch-size", "32", "--device", "cpu",
         "--width", width)
    w = str(run / "model.safetensors")
    _cli("dissect", "--model", "alexnet-like", "--weights", w, "--data", str(data), "--layers", layers,
         "--out", str(diss), "--workers", "1", "--device", "cpu", "--iou-threshold", "0.01")
    _cli("feedback", "init", "--model", "alexnet-like", "--weights", w, "--data", str(data), "--names",
         str(diss / "units.csv"), "--layer", layer, "-p", str(proj))
    return proj, diss


class Served:
    """`semlens serve` of a project in a separate process on a free loopback port (a context manager);
    ``first``: seconds from process start to the first page, ``cookie`` / ``html``: that page's."""

    def __init__(self, proj: Path, diss: Path) -> None:
        self.url = f"http://127.0.0.1:{_port()}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SEMLENS_PROGRESS": "0"}
        start = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "semlens", "serve", "-p", str(proj), "--dissection",
                                      str(diss), "--port", self.url.rsplit(":", 1)[1]], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    with urllib.request.urlopen(self.url + "/v/1/", timeout=5) as r:
                        self.cookie = r.headers.get("set-cookie", "").split(";")[0]
                        self.html = r.read().decode()
                    break
                except OSError:
                    time.sleep(0.02)
        except BaseException:
            self.close()
            raise
        self.first = time.perf_counter() - start

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unit_counts(diss: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in csv.DictReader(open(diss / "units.csv")):
        counts[r["layer"]] = counts.get(r["layer"], 0) + 1
    return counts


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, cookie: str = "") -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Cookie": cookie}), timeout=60) as r:
        return r.read()


def _post(url: str, fields: dict[str, str], cookie: str) -> None:
    """POST a form; the 303 answer is not followed (the timing is the POST's own)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    conn.request("POST", parts.path, body=urllib.parse.urlencode(fields),
                 headers={"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"})
    response = conn.getresponse()
    response.read()
    conn.close()
    if response.status >= 400:
        raise RuntimeError(f"POST {url}: {response.status}")


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[int(q) - 1] if len(xs) > 1 else xs[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--project", type=Path)
    ap.add_argument("--dissection", type=Path)
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    proj, diss = (args.project, args.dissection) if args.project else build_project(root)
    # the 256-unit grid: a wider classifier over the same images, its conv3 and conv4 dissected
    wide_proj, wide_diss = build_project(root / "wide", WIDE, "features.conv3,features.conv4", "features.conv4")
    n = args.requests
    with Served(proj, diss) as server:
        url, cookie, first = server.url, server.cookie, server.first
        csrf = re.search(r'name="csrf" value="([^"]+)"', server.html).group(1)
        layers = _unit_counts(diss)
        big = max(layers, key=layers.get)
        rows = list(csv.DictReader(open(diss / "units.csv")))
        unit = f"{url}/v/1/layer/{rows[-1]['layer']}/unit/{rows[-1]['unit']}"
        _get(url + "/v/1/sample/000001")  # load the version's model once
        images = [url + src for src in re.findall(r'src="(/v/1/layer/[^"]+/top/\d+\.png)"', _get(unit).decode())]
        t = time.perf_counter()
        for src in images:  # rendered (one forward pass each) and cached
            _get(src)
        cold = time.perf_counter() - t

        def card_with_images() -> None:
            _get(unit)
            for src in images:
                _get(src)

        concept = _concept(url, cookie)  # one the form offers (read once: not part of the remark's time)
        results = {
            "stylesheet (baseline)": timed(lambda: _get(url + "/static/app.css"), n),
            "unit card": timed(lambda: _get(unit), n),
            f"unit card + its {len(images)} top images (cached)": timed(card_with_images, n),
            f"unit grid ({layers[big]} units of {big})": timed(lambda: _get(f"{url}/v/1/layer/{big}/"), n),
            "sample page (prediction)": timed(lambda: _get(url + "/v/1/sample/000001", cookie), max(n // 4, 5)),
            "record a remark (POST)": timed(lambda: _post(url + "/remarks", {
                "csrf": csrf, "sample": "000002", "missing": concept, "text": "bench"}, cookie), n),
        }
        _post(url + "/apply", {"csrf": csrf, "steps": "5"}, cookie)
        while b'"running"' in _get(url + "/apply/status.json"):
            time.sleep(0.05)
        t = time.perf_counter()
        _post(url + "/undo", {"csrf": csrf}, cookie)
        undo = time.perf_counter() - t
    with Served(wide_proj, wide_diss) as server:
        wide = _unit_counts(wide_diss)
        widest = max(wide, key=wide.get)
        grid = f"{server.url}/v/1/layer/{widest}/"
        lazy = _get(grid).decode().count('loading="lazy"')
        results[f"unit grid ({wide[widest]} units of {widest}, wider model)"] = timed(lambda: _get(grid), n)
    base = statistics.median(results["stylesheet (baseline)"])
    print(f"first page {first:.2f} s after process start (target <= 3 s)")
    print(f"{'request':56s} {'p50 ms':>8s} {'p95 ms':>8s} {'p50 / baseline':>15s}")
    for name, xs in results.items():
        print(f"{name:56s} {1e3 * statistics.median(xs):8.1f} {1e3 * pct(xs, 95):8.1f} "
              f"{statistics.median(xs) / base:14.1f}x")
    print(f"undo after one apply: {1e3 * undo:.0f} ms (target <= 1000 ms)")
    print(f"first rendering of the card's {len(images)} top images (not cached): {1e3 * cold:.0f} ms in all")
    print(f"the {wide[widest]}-unit grid has {lazy} lazy-loaded thumbnails (loading=\"lazy\": not part of its time)")


def _concept(url: str, cookie: str) -> str:
    html = _get(url + "/v/1/sample/000002", cookie).decode()
    found = re.search(r'<select name="missing" id="missing"><option>([^<]+)</option>', html)
    if found is None:
        raise SystemExit("the project's corrected layer has no detector above its min_iou: no remark can be recorded")
    return found.group(1)


if __name__ == "__main__":
    main()
