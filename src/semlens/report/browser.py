"""Checking a written report in a headless browser (Debian's ``chromium``): does the page render at a given
width without sideways scrolling of the page itself, and does every image load? Optionally a screenshot.

``make browser`` installs chromium with apt-get when ``/usr/bin/chromium`` is absent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PageCheck", "check_page", "find_browser"]

_PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                   .map(function (i) { return i.alt || i.src.slice(0, 80); });
  var r = {viewport: window.innerWidth, page: document.documentElement.scrollWidth, body: document.body.scrollWidth,
           height: document.documentElement.scrollHeight, images: imgs.length, broken: broken,
           sections: document.querySelectorAll('section').length};
  var pre = document.createElement('pre');
  pre.id = 'semlens-check'; pre.style.display = 'none'; pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>"""


@dataclass
class PageCheck:
    """What the browser saw: ``viewport`` and ``page``/``body`` scroll widths (px), page ``height``, the
    number of ``images`` and those that did not load (``broken``: alt text or the start of the URL)."""

    viewport: int
    page: int
    body: int
    height: int
    images: int
    sections: int
    broken: list[str] = field(default_factory=list)
    screenshot: Path | None = None

    @property
    def overflows(self) -> bool:
        """Whether the page scrolls sideways (wider than the window)."""
        return max(self.page, self.body) > self.viewport


def find_browser() -> str | None:
    """Path of a chromium binary (``$SEMLENS_CHROMIUM``, ``chromium``, ``chromium-browser``), else None."""
    for name in (os.environ.get("SEMLENS_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _chromium(browser: str, args: list[str], url: str, timeout: float) -> str:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-dev-shm-usage", *args, url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{browser} failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    return res.stdout


def check_page(page: str | os.PathLike, width: int = 1280, screenshot: str | os.PathLike | None = None,
               timeout: float = 120.0) -> PageCheck:
    """Open the HTML file ``page`` at ``width`` px in headless chromium and report what it saw.

    The page is copied (with a small probe script added) to a temporary directory beside nothing else, so
    images must be embedded or absolute. ``screenshot``: also write a full-page PNG there.
    """
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError("no chromium found: install it (`make browser`, or apt-get install chromium)")
    source = Path(page).read_text(encoding="utf-8")
    probed = source.replace("</body>", _PROBE + "</body>") if "</body>" in source else source + _PROBE
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "page.html"
        copy.write_text(probed, encoding="utf-8")
        url = copy.as_uri()
        dom = _chromium(browser, [f"--window-size={width},900", "--virtual-time-budget=10000", "--dump-dom"], url,
                        timeout)
        m = re.search(r'<pre id="semlens-check"[^>]*>(.*?)</pre>', dom, flags=re.S)
        if m is None:
            raise RuntimeError(f"{page}: the page did not finish loading in the browser")
        seen = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
        result = PageCheck(**seen)
        if screenshot is not None:
            shot = Path(screenshot).resolve()
            _chromium(browser, [f"--window-size={width},{min(max(seen['height'], 600), 16000)}",
                                f"--screenshot={shot}", "--virtual-time-budget=10000"], url, timeout)
            result.screenshot = shot
    return result
