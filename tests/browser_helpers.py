"""Headless Chromium for the report tests, and a tiny PNG reader (not a test module)."""

import json
import os
import re
import shutil
import struct
import subprocess
import zlib

import numpy as np
import pytest

import dials_vmerge  # noqa: F401  (before numba: the package picks its threading layer)
from numba import njit

# Records uncaught errors and console.error calls, then, after the page's scripts ran, writes
# what it saw (and how many plot containers hold a drawn plotly SVG) into the DOM.
RECORDER = """<script>
window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(String(e.message)); });
(function () {
  var original = console.error;
  console.error = function () {
    window.__errors.push(Array.prototype.join.call(arguments, " "));
    original.apply(console, arguments);
  };
})();
window.addEventListener("load", function () {
  setTimeout(function () {
    var plots = Array.prototype.slice.call(document.querySelectorAll("div.plot"));
    var out = document.createElement("pre");
    out.id = "__test_result";
    out.textContent = JSON.stringify({
      errors: window.__errors, containers: plots.length,
      drawn: plots.filter(function (d) { return d.querySelector(".main-svg") !== null; }).length
    });
    document.body.appendChild(out);
  }, 0);
});
</script>"""


def chromium_or_skip() -> str:
    """The chromium executable; the test may skip only outside CI (CI=true must run it)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI=true but no chromium on PATH (.ci/run installs Debian's chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")


def _run(chromium, args, profile, timeout=240):
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}",
               "--virtual-time-budget=15000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def load_in_browser(chromium, html_path, work_dir) -> dict:
    """Load an instrumented copy of the report; the recorder's findings."""
    with open(html_path, encoding="utf-8") as f:
        text = f.read()
    probe = os.path.join(work_dir, "probe.html")
    with open(probe, "w", encoding="utf-8") as f:
        f.write(text.replace("<head>", "<head>" + RECORDER, 1))
    result = _run(chromium, ["--dump-dom", "file://" + os.path.abspath(probe)],
                  os.path.join(work_dir, "profile"))
    found = re.search(r'<pre id="__test_result">(.*?)</pre>', result.stdout, re.S)
    assert found, f"no recorder output; chromium stderr: {result.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def screenshot(chromium, html_path, png_path, work_dir, size=(1400, 3000)) -> np.ndarray:
    result = _run(chromium, [f"--screenshot={png_path}", f"--window-size={size[0]},{size[1]}",
                             "file://" + os.path.abspath(html_path)],
                  os.path.join(work_dir, "profile"))
    assert os.path.exists(png_path), f"no screenshot; chromium stderr: {result.stderr[-2000:]}"
    return read_png(png_path)


def read_png(path) -> np.ndarray:
    """Pixels (height, width, channels) of an 8-bit RGB or RGBA, non-interlaced PNG."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    pos, chunks, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    channels = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(chunks)), np.uint8)
    raw = raw.reshape(height, width * channels + 1)
    return _unfilter(raw, channels).reshape(height, width, channels)


@njit(cache=True)
def _unfilter(raw, channels):
    """PNG filters 0-4 (None, Sub, Up, Average, Paeth) undone, row by row."""
    height, stride = raw.shape[0], raw.shape[1] - 1
    out = np.zeros((height, stride), np.uint8)
    for y in range(height):
        kind = raw[y, 0]
        for x in range(stride):
            value = np.int32(raw[y, x + 1])
            left = np.int32(out[y, x - channels]) if x >= channels else 0
            up = np.int32(out[y - 1, x]) if y > 0 else 0
            up_left = np.int32(out[y - 1, x - channels]) if (x >= channels and y > 0) else 0
            if kind == 1:
                value += left
            elif kind == 2:
                value += up
            elif kind == 3:
                value += (left + up) // 2
            elif kind == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                if pa <= pb and pa <= pc:
                    value += left
                elif pb <= pc:
                    value += up
                else:
                    value += up_left
            out[y, x] = value & 255
    return out
