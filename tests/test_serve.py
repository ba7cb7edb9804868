"""``semlens serve``: the web app over a real classifier project, through HTTP and in headless Chromium.

One small project is made once for the module (120 concept images, a 1-epoch alexnet-like, dissection, a
feedback project). HTTP-level checks use a live uvicorn server on loopback; the browser scenarios drive
Debian's ``chromium`` with Playwright and fail if any page makes a request off the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from semlens.cli.main import app as cli

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.xdist_group("serve")  # one worker builds the project once (make test: --dist loadgroup)


def _cli(*args: str) -> str:
    r = CliRunner().invoke(cli, list(args), env={"SEMLENS_PROGRESS": "0", "COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    data, run, diss, proj = root / "data", root / "run", root / "diss", root / "proj"
    _cli("data", "concepts", "--out", str(data), "--n", "120", "--size", "32", "--workers", "1")
    _cli("train", "--data", str(data), "--out", str(run), "--epochs", "1", "--batch-size", "32", "--device", "cpu")
    weights = run / "model.safetensors"
    _cli("dissect", "--model", "alexnet-like", "--weights", str(weights), "--data", str(data), "--layers",
         "features.conv4,features.conv5", "--out", str(diss), "--workers", "1", "--device", "cpu",
         "--iou-threshold", "0.01")
    _cli("feedback", "init", "--model", "alexnet-like", "--weights", str(weights), "--data", str(data),
         "--names", str(diss / "units.csv"), "--layer", "features.conv5", "-p", str(proj))
    return {"data": data, "diss": diss, "proj": proj, "root": root}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A uvicorn server in a thread of the test process."""

    def __init__(self, proj: Path, diss: Path, token: str | None = None) -> None:
        import uvicorn

        from semlens.serve import create_app

        self.port = _free_port()
        self.app = create_app(proj, dissection=diss, token=token)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(project) -> Iterator[Server]:
    s = Server(project["proj"], project["diss"])
    yield s
    s.stop()


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace")


def _post(url: str, fields: dict[str, str], cookie: str = "") -> tuple[int, str]:
    body = urllib.parse.urlencode(fields).encode()
    req = urllib.request.Request(url, data=body, headers={"Cookie": cookie}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


# ---- HTTP ------------------------------------------------------------------------------------------------------
def test_unknown_things_are_404_pages_naming_them(server):
    for path, named in [("/v/99/", "unknown model version 99"), ("/v/1/layer/nope/", "unknown layer 'nope'"),
                        ("/v/1/layer/features.conv5/unit/999", "no unit 999"),
                        ("/v/1/sample/no-such-sample", "unknown sample 'no-such-sample'"),
                        ("/v/x/", "version must be a number"),
                        ("/img/sample/..%2F..%2Fetc%2Fpasswd.png", "no page at /img/sample/../../etc/passwd.png"),
                        ("/img/sample/.secret.png", "unknown sample '.secret'")]:
        status, text = _get(server.url + path)
        assert status == 404, (path, status)
        assert named in text.replace("&#39;", "'"), (path, text[-500:])
        assert "Traceback" not in text


def test_post_without_forgery_token_is_refused_and_changes_nothing(server, project):
    from semlens.correct.store import FeedbackStore

    before = len(FeedbackStore(project["proj"]).remarks())
    status, text = _post(server.url + "/remarks", {"sample": "000001", "missing": "x", "text": "t"})
    assert status == 403 and "forgery token" in text
    status, _ = _post(server.url + "/remarks", {"sample": "000001", "missing": "x", "csrf": "a" * 43},
                      cookie="semlens_csrf=" + "b" * 43)
    assert status == 403
    assert len(FeedbackStore(project["proj"]).remarks()) == before


def test_oversized_and_malformed_requests_are_refused(server):
    status, text = _post(server.url + "/remarks", {"text": "x" * 70_000})
    assert status == 413
    status, text = _get(server.url + "/v/1/layer/features.conv5/?min_iou=abc")
    assert status == 400 and "min_iou must be a number" in text


def test_relevant_units_are_the_layer_relevance_ranked(server):
    from semlens.explain import attribute

    view = server.app.app.state.pages.view
    rows = view.relevant_units(1, "000004", "epsilon-plus-flat", k=5)
    corr = view.corrector(1)
    x = corr._images(["000004"])
    target = int(corr.model(x).argmax(-1))
    per_unit = attribute(corr.model, x, target, "epsilon-plus-flat", layer="features.conv5")[0].flatten(1).sum(1)
    expected = torch.topk(per_unit, 5)
    assert [u.unit for u, _ in rows] == expected.indices.tolist()
    shares = torch.tensor([sh for _, sh in rows])
    assert torch.allclose(shares, expected.values / per_unit.sum(), rtol=1e-5)
    status, text = _get(server.url + "/v/1/sample/000004")
    assert status == 200 and text.count('href="/v/1/layer/features.conv5/unit/') >= 5
    status, _ = _get(server.url + "/v/1/sample/000004/heatmap.png?layer=features.conv5&unit=999")
    assert status == 404
    status, _ = _get(server.url + f"/v/1/sample/000004/heatmap.png?layer=features.conv5&unit={rows[0][0].unit}")
    assert status == 200


def test_non_loopback_bind_needs_a_token():
    from semlens.serve.security import check_bind

    with pytest.raises(ValueError, match="without --token"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "a-long-secret")
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    r = CliRunner().invoke(cli, ["serve", "-p", ".", "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "without --token" in r.output


def test_token_is_required_when_configured(project):
    s = Server(project["proj"], project["diss"], token="s3cret-token")
    try:
        assert _get(s.url + "/v/1/")[0] == 403
        assert _get(s.url + "/v/1/?token=wrong-token")[0] == 403
        assert _get(s.url + "/v/1/?token=s3cret-token")[0] == 200
        assert _get(s.url + "/v/1/", {"Cookie": "semlens_token=s3cret-token"})[0] == 200
    finally:
        s.stop()


def test_old_schema_project_is_refused_untouched(tmp_path):
    from semlens.serve import create_app

    (tmp_path / ".semlens").mkdir()
    (tmp_path / ".semlens" / "project.json").write_text('{"kind": "abacus"}')
    before = sorted(p.name for p in (tmp_path / ".semlens").iterdir())
    with pytest.raises(ValueError, match="unknown model kind 'abacus'"):
        create_app(tmp_path)
    assert sorted(p.name for p in (tmp_path / ".semlens").iterdir()) == before


# ---- browser -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        yield b
        b.close()


def _loopback_page(browser) -> Iterator:
    """A fresh browser page; after the test, fails if the page requested anything but loopback."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    requests: list[str] = []
    pg.on("request", lambda r: requests.append(r.url))
    pg.set_default_timeout(60_000)
    yield pg
    context.close()
    off = [u for u in requests if urllib.parse.urlsplit(u).hostname not in ("127.0.0.1", "localhost")]
    assert not off, f"the page made requests off the machine: {off}"


@pytest.fixture
def page(browser, server):
    yield from _loopback_page(browser)


def test_browser_layer_filter_and_unit_card(page, server, project):
    import csv

    rows = [r for r in csv.DictReader(open(project["diss"] / "units.csv")) if r["layer"] == "features.conv5"]
    concept = rows[0]["concept"]
    page.goto(server.url + "/")
    page.click("text=features.conv5")
    page.wait_for_url(re.compile(r"/v/1/layer/features\.conv5/$"))  # a click starts a navigation; wait for its load
    assert page.url.endswith("/v/1/layer/features.conv5/")
    assert page.locator("#units .card").count() == len(rows)
    page.fill("input[name=concept]", concept)
    with page.expect_navigation():  # the filtered page has loaded, not the one before the submit
        page.click("#filter button")
    shown = page.locator("#units .card .concept").all_inner_texts()
    assert shown and all(concept in c for c in shown)
    assert len(shown) == sum(concept in r["concept"] for r in rows)
    page.locator("#units .card").first.click()
    page.wait_for_url(re.compile(r"/v/1/layer/features\.conv5/unit/\d+$"))
    assert concept in page.locator("#unit-card .concept").inner_text()


def test_browser_sample_view_switches_heatmap_methods(page, server):
    page.goto(server.url + "/v/1/sample/000003")
    first = page.locator("#heatmap").get_attribute("src")
    page.wait_for_function("document.getElementById('heatmap').naturalWidth > 0")
    assert page.evaluate("document.getElementById('heatmap').naturalWidth") >= 224
    page.select_option("#method", "gradient")
    page.wait_for_url(re.compile(r"method=gradient"))
    assert page.locator("#heatmap").get_attribute("src") != first
    page.wait_for_function("document.getElementById('heatmap').naturalWidth > 0")
    assert page.locator("#prediction").inner_text().strip()


def test_browser_remark_is_listed_persisted_and_escaped(page, server, project):
    from semlens.correct.store import FeedbackStore

    page.goto(server.url + "/v/1/sample/000005")
    nasty = "<script>window.pwned=1</script> misses <b>it</b>"
    page.fill("#text", nasty)
    with page.expect_navigation():  # the form POST, its redirect and the load of the page it returns
        page.click("#submit-remark")
    assert nasty in page.locator("#sample-remarks").inner_text()
    assert page.evaluate("window.pwned === undefined")
    page.reload()
    assert nasty in page.locator("#sample-remarks").inner_text()
    assert any(r.text == nasty for r in FeedbackStore(project["proj"]).remarks())


def test_browser_apply_with_progress_then_undo_restores_bit_identical_weights(page, server, project):
    from semlens.checkpoint import load_state_dict
    from semlens.correct.store import FeedbackStore

    store = FeedbackStore(project["proj"])
    base = store.current_version()
    base_weights = load_state_dict(base.weights)
    page.goto(server.url + f"/v/{base.id}/sample/000007")
    base_prediction = page.locator("#prediction").inner_text()
    page.fill("#text", "apply me")
    with page.expect_navigation():  # the form POST, its redirect and the load of the page it returns
        page.click("#submit-remark")
    page.goto(server.url + f"/v/{base.id}/")
    page.fill("input[name=steps]", "20")
    page.fill("input[name=lr]", "0.01")
    page.click("#apply")
    page.wait_for_url(re.compile(r"/apply$"))
    page.wait_for_function("document.getElementById('job').dataset.state !== 'running'", timeout=120_000)
    assert page.locator("#job-state").inner_text() == "done", page.locator("#job-result").inner_text()
    assert page.locator("#job-step").inner_text() == "20/20"
    new = store.current_version()
    assert new.id != base.id and new.parent == base.id
    page.click("#job-result a")
    page.wait_for_url(re.compile(rf"/v/{new.id}/$"))
    # the sample view of the new version compares with the base version
    page.goto(server.url + f"/v/{new.id}/sample/000007?compare={base.id}")
    view = server.app.app.state.pages.view
    assert page.locator("#prediction").inner_text() == view.describe(new.id, "000007")
    assert page.locator("#compared").inner_text() == view.describe(base.id, "000007")
    page.goto(server.url + f"/v/{new.id}/")
    page.click("#undo")
    page.wait_for_url(re.compile(rf"/v/{base.id}/$"))
    assert store.current_version().id == base.id and store.version(new.id).state == "undone"
    after = load_state_dict(store.current_version().weights)
    assert after.keys() == base_weights.keys() and all(torch.equal(after[k], base_weights[k]) for k in after)
    assert store.verify(base.id)  # the file still has the sha256 recorded when it was made
    assert not any(r.applied_in == new.id for r in store.remarks())  # its remarks are open again
    page.goto(server.url + f"/v/{base.id}/sample/000007")
    assert page.locator("#prediction").inner_text() == base_prediction


def test_browser_cross_site_form_is_refused(page, server, project):
    """A page on another origin (another loopback port) that auto-submits a remark form to the app: the
    browser does not send the SameSite=Strict forgery cookie, so the POST is refused and nothing is stored."""
    import http.server

    from semlens.correct.store import FeedbackStore

    page.goto(server.url + "/v/1/sample/000001")  # this browser now holds the app's forgery cookie
    token = page.locator("input[name=csrf]").first.get_attribute("value")
    evil = (f'<form id="f" method="post" action="{server.url}/remarks"><input name="csrf" value="{token}">'
            '<input name="sample" value="000001"><input name="missing" value="x"><input name="text" value="forged">'
            '</form><script>document.getElementById("f").submit()</script>').encode()

    class Evil(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(evil)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Evil)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with page.expect_response(lambda r: r.url.endswith("/remarks")) as answer:
            page.goto(f"http://127.0.0.1:{httpd.server_address[1]}/")
        assert answer.value.status == 403
    finally:
        httpd.shutdown()
    assert not any(r.text == "forged" for r in FeedbackStore(project["proj"]).remarks())


def test_browser_unknown_unit_shows_a_404_page(page, server):
    response = page.goto(server.url + "/v/1/layer/features.conv5/unit/4242")
    assert response.status == 404
    assert "no unit 4242" in page.locator("#message").inner_text()
    assert page.title().startswith("Not found")


def test_second_apply_while_one_runs_is_refused(server, project):
    from semlens.serve.jobs import ApplyBusy

    runner = server.app.app.state.pages.runner
    gate = threading.Event()
    original = runner.view.project.apply

    def slow_apply(*args, **kwargs):
        gate.wait(30)
        raise RuntimeError("stopped by the test")

    runner.view.project.apply = slow_apply
    try:
        runner.start({"steps": 5})
        with pytest.raises(ApplyBusy):
            runner.start({"steps": 5})
    finally:
        gate.set()
        while runner.running:
            time.sleep(0.05)
        runner.view.project.apply = original
    assert runner.job.state == "failed" and "stopped by the test" in runner.job.error


def test_server_killed_mid_apply_loses_nothing(project, tmp_path):
    """A server process killed (SIGKILL) during apply: the remark stays open, the pending version is shown after a
    restart, and the same apply resumes that version instead of making another."""
    from semlens.correct.store import FeedbackStore

    proj = tmp_path / "proj"
    shutil.copytree(project["proj"], proj)
    shutil.copytree(project["data"], tmp_path / "data")  # the project names its data relative to itself
    FeedbackStore(proj).add_remark("000009", "missing_concept", _first_concept(project), text="survives a kill")
    open_before = [(r.id, r.text) for r in FeedbackStore(proj).remarks() if r.status == "open"]
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEMLENS_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "semlens", "serve", "-p", str(proj), "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    params = {"steps": "1000", "lr": "1e-6", "mu": "0.01"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_up(url)
        cookie, token = _csrf(url)
        assert _post(url + "/apply", {"csrf": token, **params}, cookie=cookie)[0] == 200
        deadline = time.time() + 60
        while FeedbackStore(proj).versions()[-1].state != "pending":
            assert time.time() < deadline, "apply never started"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    store = FeedbackStore(proj)
    assert [(r.id, r.text) for r in store.remarks() if r.status == "open"] == open_before
    pending = [v for v in store.versions() if v.state == "pending"]
    current = store.current_version().id
    assert len(pending) == 1 and pending[0].parent == current
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_up(url)
        status, text = _get(url + f"/v/{current}/")
        assert status == 200 and "survives a kill" in text and "pending" in text
        cookie, token = _csrf(url)
        assert _post(url + "/apply", {"csrf": token, **params}, cookie=cookie)[0] == 200
        deadline = time.time() + 180
        while (state := json.loads(_get(url + "/apply/status.json")[1])["state"]) == "running":
            assert time.time() < deadline, "resumed apply did not finish"
            time.sleep(0.2)
        assert state == "done"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    store = FeedbackStore(proj)
    assert store.current_version().id == pending[0].id  # the pending version was resumed, not duplicated
    assert sum(v.state == "pending" for v in store.versions()) == 0
    assert all(store.remark(rid).status == "applied" for rid, _ in open_before)


def _first_concept(project) -> str:
    from semlens.serve.project_view import ProjectView

    return ProjectView(project["proj"]).concepts()[0]


def _wait_up(url: str) -> None:
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/apply/status.json", timeout=2)
            return
        except (urllib.error.URLError, ConnectionError):
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.1)


def _csrf(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url + "/v/1/", timeout=60) as r:
        cookie = r.headers.get("set-cookie", "").split(";")[0]
        html = r.read().decode()
    token = re.search(r'name="csrf" value="([^"]+)"', html).group(1)
    return cookie, token


@pytest.fixture(scope="module")
def captioner_project(tmp_path_factory) -> Path:
    """A tiny captioner project: 36 clips of 4 frames (8 features), 3 topics, an LSTM-I of width 8."""
    from test_captioner_cli import write_corpus

    root = tmp_path_factory.mktemp("serve-captioner")
    corpus = write_corpus(root / "corpus")
    run = root / "run"
    _cli("caption", "train", "--corpus", str(corpus), "--out", str(run), "--lam", "2", "--topics", "3",
         "--epochs", "3", "--batch-size", "16", "--lr", "0.01", "--hidden", "8", "--embed", "8",
         "--decoder-hidden", "8", "--attention", "4", "--dropout", "0", "--device", "cpu")
    _cli("feedback", "init", "--kind", "captioner", "--weights", str(run / "model.safetensors"),
         "--data", str(corpus), "--project", str(root / "proj"))
    return root / "proj"


@pytest.fixture(scope="module")
def captioner_server(captioner_project) -> Iterator[Server]:
    s = Server(captioner_project, None)
    yield s
    s.stop()


def test_captioner_sample_view_shows_caption_references_and_topic_neurons(captioner_server):
    """A captioner project: the sample page shows the version's caption, the human captions and the named
    topic neurons' activation at every frame (the values equal the encoder's states)."""
    s = captioner_server
    view = s.app.app.state.pages.view
    status, text = _get(s.url + "/v/1/sample/v30")
    assert status == 200, text[-2000:]
    assert view.describe(1, "v30") in text
    for caption in view.reference_captions("v30")[:5]:
        assert caption.replace("'", "&#39;") in text
    rows = view.topic_neurons(1, "v30")
    assert rows and 'id="neurons"' in text and f"v:{rows[0]['neuron']}" in text
    corr = view.corrector(1)
    feats, lengths = corr._feats(["v30"])
    states, _ = corr.model.encode(feats, lengths)
    want = states[0, : int(lengths[0]), int(rows[0]["neuron"])]
    assert torch.allclose(torch.tensor(rows[0]["values"]), want, atol=1e-3)
    assert _get(s.url + "/v/1/sample/v999")[0] == 404


def test_a_project_whose_data_is_gone_gets_a_page_naming_the_file(project, tmp_path):
    shutil.copytree(project["proj"], tmp_path / "proj")  # without ../data
    s = Server(tmp_path / "proj", project["diss"])
    try:
        status, text = _get(s.url + "/v/1/")
        assert status == 404 and "Missing file" in text and "index.csv" in text and "Traceback" not in text
        assert _get(s.url + "/v/1/layer/features.conv5/")[0] == 200  # what needs no data still works
        status, text = _get(s.url + "/v/1/layer/features.conv5/unit/0")
        assert status == 200 and 'id="top-note"' in text and "top images unavailable" in text and "not found" in text
    finally:
        s.stop()


# ---- unit cards: top images, prototypes, x-features ---------------------------------------------------------------
def _pixel_unit(project, layer: str = "features.conv5") -> int:
    """A unit of ``layer`` labelled with a pixel-level concept (not a scene: its mask would be the whole image)."""
    import csv

    rows = [r for r in csv.DictReader(open(project["diss"] / "units.csv")) if r["layer"] == layer]
    return next(int(r["unit"]) for r in rows if r["category"] != "scene")


def _png(url: str):
    """The RGB pixels (H, W, 3) uint8 of a PNG the server answers with."""
    import io

    import numpy as np
    from PIL import Image

    with urllib.request.urlopen(url, timeout=60) as r:
        assert r.headers["content-type"] == "image/png"
        return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))


def test_unit_card_top_images_outline_the_concept_mask_and_the_units_region(server, project):
    """Every top image served for a card: its magenta pixels are exactly the boundary of the unit's concept mask,
    its cyan pixels exactly the boundary of the unit's thresholded activation (where the mask's does not cover it),
    both computed here from the data, the model and units.csv."""
    import csv

    import numpy as np
    import torch.nn.functional as F
    from scipy.ndimage import binary_erosion

    from semlens.layers import capture_activations
    from semlens.serve.unit_media import CONCEPT_RGB, REGION_RGB
    from semlens.world import BrodenDataset

    layer, unit = "features.conv5", _pixel_unit(project)
    row = next(r for r in csv.DictReader(open(project["diss"] / "units.csv"))
               if r["layer"] == layer and int(r["unit"]) == unit)
    status, html = _get(server.url + f"/v/1/layer/{layer}/unit/{unit}")
    assert status == 200
    srcs = re.findall(rf'src="(/v/1/layer/{re.escape(layer)}/unit/{unit}/top/(\d+)\.png)" alt="top image \d+: ([^"]+)"',
                      html)
    assert len(srcs) == 8 and [int(r) for _, r, _ in srcs] == list(range(8))
    ds = BrodenDataset(project["data"])
    numbers = [n for n, name, _ in ds.labels if name == row["concept"] and n > 0]
    model = server.app.app.state.pages.view.corrector(1).model
    cross = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)

    def edge(m):
        return m & ~binary_erosion(m, structure=cross, border_value=0)

    for src, _, name in srcs:
        arr = _png(server.url + src)
        batch = ds.load_batch([ds.images.index(name)])
        s = arr.shape[0] // ds.image_size[0]
        assert s * ds.image_size[0] >= 192 and arr.shape[:2] == (s * ds.image_size[0], s * ds.image_size[1])
        image = np.kron((batch.images[0] * 255).round().byte().permute(1, 2, 0).numpy(), np.ones((s, s, 1), np.uint8))
        for colour in (CONCEPT_RGB, REGION_RGB):  # the outline colours occur nowhere in the image itself
            assert not (image == np.array(colour, np.uint8)).all(-1).any()
        mask = np.zeros(ds.seg_size, bool)
        for maps in batch.pixel.values():
            mask |= np.isin(maps[0].numpy(), numbers).any(0)
        with torch.no_grad(), capture_activations(model, layer) as acts:
            model(batch.images)
        act = F.interpolate(acts[layer][:, unit:unit + 1], size=ds.seg_size, mode="bilinear", align_corners=False)
        region = (act[0, 0] > float(row["threshold"])).numpy()
        up = np.ones((s, s), bool)
        concept_edge, region_edge = edge(np.kron(mask, up)), edge(np.kron(region, up))
        assert np.array_equal((arr == np.array(CONCEPT_RGB, np.uint8)).all(-1), concept_edge), name
        assert np.array_equal((arr == np.array(REGION_RGB, np.uint8)).all(-1), region_edge & ~concept_edge), name
        rest = ~(concept_edge | region_edge)
        assert np.array_equal(arr[rest], image[rest])
    assert _get(server.url + f"/v/1/layer/{layer}/unit/{unit}/top/8.png")[0] == 404
    assert _get(server.url + f"/v/1/layer/{layer}/unit/999/top/0.png")[0] == 404


def test_unit_card_without_top_images_file_says_why(project, tmp_path):
    old = tmp_path / "diss"
    shutil.copytree(project["diss"], old)
    (old / "top_images.safetensors").unlink()  # a dissection written before the file existed
    s = Server(project["proj"], old)
    try:
        status, html = _get(s.url + "/v/1/layer/features.conv5/unit/0")
        assert status == 200 and 'id="top-note"' in html and "has no top_images.safetensors" in html
        assert "/top/" not in html and 'id="unit-card"' in html
        status, html = _get(s.url + "/v/1/layer/features.conv5/")
        assert status == 200 and 'loading="lazy"' not in html  # no thumbnails to load
        assert _get(s.url + "/v/1/layer/features.conv5/unit/0/top/0.png")[0] == 404
    finally:
        s.stop()


def test_attached_prototypes_and_xfeatures_show_on_the_card(project, tmp_path, server):
    """`semlens maximize` and `semlens embed fit` outputs attached to a project appear on its unit cards; the
    project without them shows notes instead."""
    status, html = _get(server.url + "/v/1/layer/features.conv5/unit/0")
    assert 'id="no-prototypes"' in html and 'id="no-xfeatures"' in html and "/prototype/" not in html
    weights = str(project["root"] / "run" / "model.safetensors")
    am, emb = tmp_path / "am", tmp_path / "emb"
    _cli("maximize", "--weights", weights, "--layer", "features.conv5", "--units", "0-1", "--data",
         str(project["data"]), "--out", str(am), "--steps", "3", "--views", "0", "--limit", "40", "--device", "cpu")
    _cli("embed", "fit", "--weights", weights, "--layer", "features.conv5", "--data", str(project["data"]), "--out",
         str(emb), "--method", "pca", "--k", "3", "--target", "all", "--device", "cpu")
    proj = tmp_path / "proj"
    shutil.copytree(project["proj"], proj)
    shutil.copytree(project["data"], tmp_path / "data")
    out = _cli("feedback", "attach", "-p", str(proj), "--prototypes", str(am), "--embedding", str(emb))
    assert "prototypes" in out and "embeddings" in out
    cfg = json.loads((proj / ".semlens" / "project.json").read_text())
    assert cfg["prototypes"] == ["../am"] and cfg["embeddings"] == ["../emb"]  # relative: the project can move
    r = CliRunner().invoke(cli, ["feedback", "attach", "-p", str(proj), "--embedding", str(am)])
    assert r.exit_code != 0 and "embedding.json" in r.output  # a maximize output is not an embedding
    s = Server(proj, project["diss"])
    try:
        status, html = _get(s.url + "/v/1/layer/features.conv5/unit/1")
        assert status == 200 and 'id="prototypes"' in html and 'id="xfeatures"' in html
        src = re.search(r'src="(/v/1/layer/features.conv5/unit/1/prototype/0.png)"', html).group(1)
        assert _png(s.url + src).shape[0] >= 192
        from semlens.serve.unit_media import encoder_loadings

        view = s.app.app.state.pages.view
        emb_obj, load, _ = view.media._embedding(emb)
        rows = re.findall(r"<tr><td>x(\d+)</td>", html)
        assert [int(i) for i in rows] == load[0, :, 1].abs().argsort(descending=True)[:3].tolist()
        assert torch.equal(load, encoder_loadings(emb_obj))
        status, html = _get(s.url + "/v/1/layer/features.conv5/unit/5")  # not maximized: x-features only
        assert 'id="no-prototypes"' in html and 'id="xfeatures"' in html
        status, html = _get(s.url + "/v/1/layer/features.conv4/unit/0")  # another layer than the embedding's
        assert 'id="no-xfeatures"' in html
        assert _get(s.url + "/v/1/layer/features.conv5/unit/5/prototype/0.png")[0] == 404
    finally:
        s.stop()


def test_browser_unit_card_images_all_load(page, server, project):
    layer, unit = "features.conv5", _pixel_unit(project)
    page.goto(server.url + f"/v/1/layer/{layer}/")
    assert page.locator("#units img[loading=lazy]").count() == page.locator("#units .card").count()
    page.goto(server.url + f"/v/1/layer/{layer}/unit/{unit}")
    assert page.locator("#top-images img").count() == 8
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    widths = page.evaluate("Array.from(document.images).map(i => [i.src, i.naturalWidth])")
    assert widths and all(w > 0 for _, w in widths), widths
    assert all(w >= 192 for src, w in widths if "/top/" in src)


@pytest.fixture
def caption_page(browser, captioner_server):
    yield from _loopback_page(browser)


def test_browser_captioner_sample_view_and_a_missed_topic_remark(caption_page, captioner_server, captioner_project):
    """Open a clip of a captioner project in Chromium: its caption, reference captions and topic neurons with
    their activation through time; say the caption misses a topic, see the remark listed and stored."""
    from semlens.correct.store import FeedbackStore

    page, view = caption_page, captioner_server.app.app.state.pages.view
    page.goto(captioner_server.url + "/")
    page.click("a.thumb >> text=v31")
    page.wait_for_url(re.compile(r"/v/1/sample/v31$"))
    assert page.locator("#prediction").inner_text() == view.describe(1, "v31")
    assert page.locator("#references li").all_inner_texts() == view.reference_captions("v31")[:5]
    rows = view.topic_neurons(1, "v31")
    cells = page.locator("#neurons tbody tr")
    assert cells.count() == len(rows) > 0
    assert cells.first.locator("td").first.inner_text() == f"v:{rows[0]['neuron']}"
    assert cells.first.locator("td").nth(1).inner_text() == rows[0]["topic_name"]
    n_frames = len(rows[0]["values"])
    line = cells.first.locator("svg polyline")
    assert len(line.get_attribute("points").split()) == n_frames  # one point per frame
    assert f"over {n_frames} frames" in cells.first.locator("svg").get_attribute("aria-label")
    topic = view.concepts()[-1]
    page.select_option("#missing", topic)
    page.fill("#text", "the caption never says it")
    with page.expect_navigation():  # the form POST, its redirect and the load of the page it returns
        page.click("#submit-remark")
    listed = page.locator("#sample-remarks").inner_text()
    assert f"misses {topic}: the caption never says it (open)" in listed
    stored = [r for r in FeedbackStore(captioner_project).remarks() if r.sample_id == "v31"]
    assert [(r.kind, r.target, r.status) for r in stored] == [("missing_topic", topic, "open")]
