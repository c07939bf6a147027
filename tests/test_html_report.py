"""``report.html`` of a real ``xbt eval`` run: self-contained, every number from metrics.json, rendered in a browser.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs
them) and ``selenium``. Where they are missing it is skipped saying so, except in CI
(``CI=true``), where a missing browser is a failure.
"""

from __future__ import annotations

import base64
import io
import json
import os
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image

from xbt import XBTModel, load_backbone
from xbt.cli import main as cli
from xbt.demo.scenes import read_split, write_split
from xbt.projection import Projection
from xbt.report import _fmt

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


class _Page(HTMLParser):
    """The page's images, its numbers by data-key, its example rows, and every tag name."""

    def __init__(self):
        super().__init__()
        self.images, self.numbers, self.tags, self.links = [], {}, [], []
        self._key: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.links += [value for name, value in attrs.items() if name in ("src", "href") and value]
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "td" and "data-key" in attrs:
            self._key = attrs["data-key"]

    def handle_data(self, data):
        if self._key is not None:
            self.numbers[self._key] = data
            self._key = None


def _at(report, key: str):
    value = report
    for part in key.split("."):
        if value is None:  # e.g. gap_recovered of a cell that is not scored
            return None
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


@pytest.fixture(scope="module")
def run(tiny_refs, tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    eval_set = write_split(root / "test", "shapes", 24, seed=0, split="test")
    old, new = load_backbone(tiny_refs["open_clip"]), load_backbone(tiny_refs["hf"])
    _, captions = read_split(eval_set)
    texts = [c for group in captions for c in group]
    solution = torch.linalg.lstsq(new.encode_text(texts), old.encode_text(texts)).solution
    projection = Projection.from_linear_map(solution.T, source_space=new.fingerprint, target_space=old.fingerprint)
    XBTModel(new, projection, old_reference=tiny_refs["open_clip"]).save_pretrained(root / "adapter")
    output = root / "eval"
    assert cli(["eval", "--old_model", tiny_refs["open_clip"], "--new_model", tiny_refs["hf"], "--adapter",
                str(root / "adapter"), "--eval_set", str(eval_set), "--output_dir", str(output)]) == 0
    return output


def test_the_page_is_self_contained_and_every_number_is_from_metrics_json(run):
    report = json.loads((run / "metrics.json").read_text())
    page = _Page()
    page.feed((run / "report.html").read_text())
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert all(link.startswith("data:image/png;base64,") for link in page.links)  # nothing fetched from anywhere
    for source in page.images:
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as image:
            image.verify()
    # every matrix and AUC figure is metrics.json's, and every one of them is on the page
    expected = {f"cells.{i}.{field}.{k}" for i, cell in enumerate(report["cells"]) for field in ("recall",
                "gap_recovered") for k in cell["recall"]}
    expected |= {f"{key}.{direction}.orderings.{name}.auc.{k}" for key in ("backfill", "backfill_new_model")
                 for direction, curve in report[key].items() for name, values in curve["orderings"].items()
                 for k in values["auc"]}
    assert set(page.numbers) == expected and report["backfill"] and report["backfill_new_model"]
    for key, text in page.numbers.items():
        value = _at(report, key)
        assert text == _fmt(value, 2 if ".gap_recovered." in key else 1), key
    # 3 plots + the example images: each text→image example shows a query caption and 3 rows of 5 images
    examples = report["examples"]["text→image"]
    assert len(examples) == 4 and all(list(e["hits"]) == ["old→old", "xbt→old", "new→new"] for e in examples)
    assert len(page.images) == 3 + sum(len(hits) for e in examples for hits in e["hits"].values()) \
        + len(report["examples"]["image→text"])  # image→text: the query is the image


def _browser_or_reason() -> str | None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if missing:
        return f"{', '.join(missing)} not installed (Debian packages chromium and chromium-driver; .ci/run installs them)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install '.[dev]')"
    return None


def test_the_page_renders_in_a_real_browser_without_any_network_request(run, tmp_path):
    reason = _browser_or_reason()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs the browser test: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get((run / "report.html").resolve().as_uri())
        sizes = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);")
        requests = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    finally:
        driver.quit()
    assert sizes and all(complete and width > 0 and height > 0 for complete, width, height in sizes)
    urls = [m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"]
    assert (run / "report.html").resolve().as_uri() in urls  # the log saw the page itself load ...
    network = [url for url in urls if url.split(":", 1)[0] in ("http", "https", "ws", "wss", "ftp")]
    assert not network, network  # ... and nothing from a network (chrome:// pages are the browser's own)

