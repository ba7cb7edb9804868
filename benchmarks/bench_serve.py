"""Latency of the web app (`semlens serve`) against a live server on loopback.

Builds a small classifier project (or uses --project/--dissection), starts `semlens serve` as a separate
process, and prints:
- time from process start to the first page (target: within 3 s);
- p50/p95 of a unit card, the same card with its 8 top images once they are cached, the largest layer's unit
  grid, the unit grid of a 256-unit layer (a wider classifier built for it; its thumbnails are lazy-loaded, so
  the page is the HTML), a sample page, and recording a remark (POST) over --requests requests each (targets:
  unit card p95 <= 100 ms once its images are cached, grid <= 1 s, remark p95 <= 50 ms); the first (uncached)
  rendering of a card's 8 top images;
- undo after one apply (target <= 1 s);
- the baseline measured in the same run: p50 of the static stylesheet (the server's floor per request),
  and each page's p50 as a ratio to it.
Then the same for a captioner project (a small one built from the built-in clips, or --captioner-project DIR,
e.g. demo-out/projects/captioner): first page, the sample view (caption, reference captions, topic neurons
through time) p50/p95, recording a remark "misses topic T" p50/p95, undo after one apply.

    python benchmarks/bench_serve.py [--requests 200] [--project DIR --dissection DIR]
        [--kind both|classifier|captioner] [--captioner-project DIR]
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


def build_project(root: Path, width: str = "1", layers: str = "all-conv", layer: str | None = None
                  ) -> tuple[Path, Path]:
    """A classifier project over 300 concept images (32 px): alexnet-like of channel ``width``, ``layers``
    dissected (top images included), unit names of ``layer`` corrected (default: the deepest named one)."""
    data, run, diss, proj = root / "data", root / "run", root / "diss", root / "proj"
    if not data.exists():
        _cli("data", "concepts", "--out", str(data), "--n", "300", "--size", "32", "--workers", "1")
    _cli("train", "--data", str(data), "--out", str(run), "--epochs", "2", "--batch-size", "32", "--device", "cpu",
         "--width", width)
    w = str(run / "model.safetensors")
    _cli("dissect", "--model", "alexnet-like", "--weights", w, "--data", str(data), "--layers", layers,
         "--out", str(diss), "--workers", "1", "--device", "cpu", "--iou-threshold", "0.01")
    _cli("feedback", "init", "--model", "alexnet-like", "--weights", w, "--data", str(data), "--names",
         str(diss / "units.csv"), "--layer", layer or _named_layer(diss / "units.csv"), "-p", str(proj))
    return proj, diss


def _unit_counts(diss: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in csv.DictReader(open(diss / "units.csv")):
        counts[r["layer"]] = counts.get(r["layer"], 0) + 1
    return counts


def _named_layer(units_csv: Path, min_iou: float = 0.04) -> str:
    """The deepest conv layer with a unit whose IoU passes ``min_iou`` (the project's threshold for a concept a
    remark can name), so that the remark benchmark has a concept; features.conv5 when none has."""
    best: dict[str, float] = {}
    for r in csv.DictReader(open(units_csv)):
        best[r["layer"]] = max(best.get(r["layer"], 0.0), float(r["iou"]))
    named = [layer for layer, iou in best.items() if iou > min_iou]
    return named[-1] if named else "features.conv5"


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
    ap.add_argument("--kind", choices=("both", "classifier", "captioner"), default="both")
    ap.add_argument("--captioner-project", type=Path, help="a captioner project (default: a small one is built)")
    args = ap.parse_args()
    if args.kind == "captioner":
        return bench_captioner(args.requests, args.captioner_project)
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    proj, diss = (args.project, args.dissection) if args.project else build_project(root)
    # the 256-unit grid: a wider classifier over the same images, its conv3 and conv4 dissected
    wide_proj, wide_diss = build_project(root / "wide", WIDE, "features.conv3,features.conv4", "features.conv4")
    n = args.requests
    proc, url, first, html, cookie, csrf = _start(proj, "--dissection", str(diss))
    try:
        rows = list(csv.DictReader(open(diss / "units.csv")))
        layers = _unit_counts(diss)
        big = max(layers, key=layers.get)
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

        concept = _concept(url, cookie)  # read once: the remark's timing is the POST's alone
        results = {
            "stylesheet (baseline)": timed(lambda: _get(url + "/static/app.css"), n),
            "unit card": timed(lambda: _get(unit), n),
            f"unit card + its {len(images)} top images (cached)": timed(card_with_images, n),
            f"unit grid ({layers[big]} units of {big})": timed(lambda: _get(f"{url}/v/1/layer/{big}/"), n),
            "sample page (prediction)": timed(lambda: _get(url + "/v/1/sample/000001", cookie), max(n // 4, 5)),
            "record a remark (POST)": timed(lambda: _post(url + "/remarks", {
                "csrf": csrf, "sample": "000002", "missing": concept, "text": "bench"}, cookie), n),
        }
        undo = apply_then_undo(url, csrf, cookie)
    finally:
        proc.terminate()
        proc.wait(10)
    proc, wide_url, *_ = _start(wide_proj, "--dissection", str(wide_diss))
    try:
        wide = _unit_counts(wide_diss)
        widest = max(wide, key=wide.get)
        grid = f"{wide_url}/v/1/layer/{widest}/"
        lazy = _get(grid).decode().count('loading="lazy"')
        results[f"unit grid ({wide[widest]} units of {widest}, wider model)"] = timed(lambda: _get(grid), n)
    finally:
        proc.terminate()
        proc.wait(10)
    report("", first, results, undo)
    print(f"first rendering of the card's {len(images)} top images (not cached): {1e3 * cold:.0f} ms in all")
    print(f"the {wide[widest]}-unit grid has {lazy} lazy-loaded thumbnails (loading=\"lazy\": not part of its time)")
    if args.kind == "both":
        bench_captioner(args.requests, args.captioner_project)


def apply_then_undo(url: str, csrf: str, cookie: str) -> float:
    """Apply the open remarks (5 steps), wait for it, then time the undo POST (seconds)."""
    _post(url + "/apply", {"csrf": csrf, "steps": "5"}, cookie)
    while b'"running"' in _get(url + "/apply/status.json"):
        time.sleep(0.05)
    t = time.perf_counter()
    _post(url + "/undo", {"csrf": csrf}, cookie)
    return time.perf_counter() - t


def report(title: str, first: float, results: dict[str, list[float]], undo: float) -> None:
    """Print the first-page time, p50/p95 (ms) of each request and its p50 over the stylesheet's, and undo."""
    base = statistics.median(results["stylesheet (baseline)"])
    print(f"{title}first page {first:.2f} s after process start (target <= 3 s)")
    print(f"{'request':56s} {'p50 ms':>8s} {'p95 ms':>8s} {'p50 / baseline':>15s}")
    for name, xs in results.items():
        print(f"{name:56s} {1e3 * statistics.median(xs):8.1f} {1e3 * pct(xs, 95):8.1f} "
              f"{statistics.median(xs) / base:14.1f}x")
    print(f"undo after one apply: {1e3 * undo:.0f} ms (target <= 1000 ms)")


def build_captioner_project(root: Path) -> Path:
    """A captioner project of the demo captioner's size: 120 built-in clips of 8 frames (features: each frame
    average-pooled to 4 x 4, 48 numbers), LSTM-I with 8 topics, hidden 48, trained 3 epochs; neurons named by PDM."""
    from semlens.world import generate_clips, pooled_frame_features, write_clip_corpus

    clips = generate_clips(n=120, frames=8, size=32, seed=0)
    corpus = write_clip_corpus(clips, root / "corpus", features=pooled_frame_features(clips.frames, grid=4),
                               write_frames=False)
    run, proj = root / "caprun", root / "capproj"
    _cli("caption", "train", "--corpus", str(corpus), "--out", str(run), "--lam", "10", "--topics", "8",
         "--epochs", "3", "--batch-size", "32", "--lr", "0.003", "--hidden", "48", "--embed", "32",
         "--decoder-hidden", "48", "--attention", "32", "--dropout", "0.2", "--device", "cpu")
    _cli("feedback", "init", "--kind", "captioner", "--weights", str(run / "model.safetensors"), "--data",
         str(corpus), "-p", str(proj))
    return proj


def _start(proj: Path, *extra: str) -> tuple[subprocess.Popen, str, float, str, str, str]:
    """Start ``semlens serve`` on a free loopback port and wait for the first page: (process, url, seconds from
    process start to the first page, the page, forgery cookie, forgery token)."""
    port = _port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEMLENS_PROGRESS": "0"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "semlens", "serve", "-p", str(proj), "--port", str(port), *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            with urllib.request.urlopen(url + "/v/1/", timeout=5) as r:
                cookie = r.headers.get("set-cookie", "").split(";")[0]
                html = r.read().decode()
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"semlens serve -p {proj} exited with {proc.returncode}") from None
            time.sleep(0.02)
    first = time.perf_counter() - start
    csrf = re.search(r'name="csrf" value="([^"]+)"', html).group(1)
    return proc, url, first, html, cookie, csrf


def bench_captioner(n: int, project: Path | None = None) -> None:
    """Point 4 latencies on a captioner project (``project`` or a small one built now): first page after start,
    the sample view (caption decoded, reference captions, topic neurons through time) p50/p95, recording a
    remark "misses topic T" (POST) p50/p95, each over ``n`` requests; undo after one apply."""
    tmp = tempfile.TemporaryDirectory()
    proj = project or build_captioner_project(Path(tmp.name))
    proc, url, first, html, cookie, csrf = _start(proj)
    try:
        samples = re.findall(r'href="/v/1/sample/([^"]+)"', html)
        if not samples:
            raise RuntimeError(f"the overview of {proj} lists no clips")
        page = _get(f"{url}/v/1/sample/{samples[0]}", cookie).decode()  # loads the version's model once
        topic = re.search(r'<select name="missing" id="missing"><option>([^<]+)</option>', page).group(1)
        i = iter(range(10 ** 9))
        results = {
            "stylesheet (baseline)": timed(lambda: _get(url + "/static/app.css"), n),
            "sample view (caption, references, neurons)": timed(
                lambda: _get(f"{url}/v/1/sample/{samples[next(i) % len(samples)]}", cookie), n),
            "record a remark 'misses topic' (POST)": timed(lambda: _post(url + "/remarks", {
                "csrf": csrf, "sample": samples[1 % len(samples)], "missing": topic, "text": "bench"}, cookie), n),
        }
        undo = apply_then_undo(url, csrf, cookie)
    finally:
        proc.terminate()
        proc.wait(10)
    report(f"\ncaptioner project ({len(samples)} clips listed): ", first, results, undo)


def _concept(url: str, cookie: str) -> str:
    html = _get(url + "/v/1/sample/000002", cookie).decode()
    found = re.search(r'<select name="missing" id="missing"><option>([^<]+)</option>', html)
    if found is None:
        raise SystemExit("the project's corrected layer has no detector above its min_iou: no remark can be recorded")
    return found.group(1)


if __name__ == "__main__":
    main()
