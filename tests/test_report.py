"""Report files from real cells: metrics.json round trip, Markdown rows, plots that open as PNGs."""

import json

import numpy as np
from PIL import Image

from xbt.report import cells_to_json, markdown, write_report
from xbt.retrieval import Labeled, SearchConfig, backfill_curve, evaluate_cell, score_against_reference


def _report(config=None):
    rng = np.random.default_rng(0)
    images = {s: Labeled(rng.normal(size=(60, 8)).astype(np.float32), np.arange(60)) for s in ("old", "new", "xbt")}
    owners = np.repeat(np.arange(60), 2)
    texts = {s: Labeled(images[s].vectors[owners] + rng.normal(size=(120, 8)).astype(np.float32) * noise, owners)
             for s, noise in (("old", 1.5), ("new", 0.5), ("xbt", 1.0))}
    cells = [evaluate_cell(direction, q, g, queries[q], gallery[g], config=config)
             for direction, queries, gallery in (("text→image", texts, images), ("image→text", images, texts))
             for q, g in (("old", "old"), ("new", "new"), ("xbt", "old"), ("xbt", "xbt"))]
    score_against_reference(cells)
    backfill = backfill_curve(texts["xbt"], images["old"], images["xbt"].vectors)
    return {"xbt_version": "test", "models": {"old": {"reference": "hf:/old", "fingerprint": "hf-1"}},
            "dataset": {"images": 60, "captions": 120}, "search": {"index_factory": "Flat"}, "ks": [1, 5, 10],
            "cells": cells_to_json(cells), "backfill": {"text→image": {"query": "xbt", **backfill}}}


def test_report_files_are_written_and_valid(tmp_path):
    report = json.loads(json.dumps(_report()))  # exactly what metrics.json can hold
    paths = write_report(report, tmp_path / "out")
    assert json.loads(paths["metrics"].read_text()) == report
    for kind in ("matrix", "backfill", "recall_bars"):
        with Image.open(paths[kind]) as image:
            assert image.format == "PNG" and image.size[0] > 300
            image.verify()
    text = paths["markdown"].read_text()
    assert "## text→image" in text and "## image→text" in text and "## Backfill, text→image" in text
    xbt_row = next(line for line in text.splitlines() if line.startswith("| `xbt→old`"))
    cell = next(c for c in report["cells"] if c["name"] == "xbt→old")
    assert f"{cell['recall']['1']:.1f}" in xbt_row and xbt_row.count("✓") + xbt_row.count("✗") == 3
    assert text.count("| 0.") + text.count("| 1.0") >= 11  # one row per backfill fraction


def test_approximate_search_adds_exact_recall_and_loss():
    report = _report(SearchConfig("IVF4,Flat", "nprobe=1"))
    cell = report["cells"][0]
    assert cell["recall_loss"] == {k: cell["exact_recall"][k] - cell["recall"][k] for k in ("1", "5", "10")}
    assert "exact R@1" in markdown(report)
