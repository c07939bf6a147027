"""Report files from real cells: metrics.json round trip, every Markdown number equal to its cell, plots as PNGs."""

import json
import re

import numpy as np
from PIL import Image

from xbt.evaluation.encode import stored_space
from xbt.evaluation.plan import ADAPTER, NEW_MODEL, OLD_MODEL, plan_cells, score_cells
from xbt.report import cells_to_json, markdown, plot_recall_bars, write_report
from xbt.backfill import curves_by_ordering
from xbt.retrieval import Labeled, SearchConfig, evaluate_cell


def _report(config=None):
    rng = np.random.default_rng(0)
    spaces = [stored_space("old", OLD_MODEL, "space-old", 8), stored_space("new", NEW_MODEL, "space-new", 8),
              stored_space("xbt", ADAPTER, "space-old", 8)]
    ids = np.array([f"item-{i:03d}" for i in range(60)])
    images = {s.name: Labeled(rng.normal(size=(60, 8)).astype(np.float32), ids, s.space_id) for s in spaces}
    owners = np.repeat(np.arange(60), 2)
    texts = {s: Labeled(images[s].vectors[owners] + rng.normal(size=(120, 8)).astype(np.float32) * noise, ids[owners],
                        images[s].space_id)
             for s, noise in (("old", 1.5), ("new", 0.5), ("xbt", 1.0))}
    pools = {"text→image": (texts, images), "image→text": (images, texts)}
    plan = plan_cells(spaces, {d: (set(q), set(g)) for d, (q, g) in pools.items()})
    cells = [evaluate_cell(c.direction, c.query, c.gallery, pools[c.direction][0][c.query],
                           pools[c.direction][1][c.gallery], config=config, role=c.role) for c in plan]
    score_cells(cells)
    orderings = curves_by_ordering(texts["xbt"], images["old"], images["xbt"], None, ["random", "hubness"])
    return {"xbt_version": "test", "spaces": {s.name: s.describe() for s in spaces},
            "dataset": {"images": 60, "captions": 120}, "search": {"index_factory": "Flat"}, "ks": [1, 5, 10],
            "cells": cells_to_json(cells), "backfill": {"text→image": {"query": "xbt", "gallery": "old", "reembedded_by": "xbt", "seed": 0,
                                                        "orderings": orderings}}}


def _table_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """``{(direction, cell name): [cells of its Markdown row]}`` from the per-direction tables."""
    rows, direction = {}, None
    for line in text.splitlines():
        heading = re.match(r"## (text→image|image→text)$", line)
        if heading:
            direction = heading.group(1)
        elif line.startswith("## "):
            direction = None
        elif direction and line.startswith("| `"):
            fields = [field.strip() for field in line.strip("|").split("|")]
            rows[(direction, fields[0].strip("`"))] = fields[1:]
    return rows


def test_report_files_are_written_and_every_table_number_is_its_cells(tmp_path):
    report = json.loads(json.dumps(_report()))  # exactly what metrics.json can hold
    paths = write_report(report, tmp_path / "out")
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics == report
    for kind in ("matrix", "backfill", "recall_bars"):
        with Image.open(paths[kind]) as image:
            assert image.format == "PNG" and image.size[0] > 300
            image.verify()

    # The plan made exactly these cells, with these roles, from the space ids (xbt writes old's space).
    roles = {(c["direction"], c["name"]): c["role"] for c in metrics["cells"]}
    expected = {"old→old": "lower bound", "new→new": "upper bound", "xbt→old": "compatibility",
                "xbt→xbt": "reindexed", "old→xbt": "reindexed"}
    assert roles == {(d, name): role for d in ("text→image", "image→text") for name, role in expected.items()}
    for cell in metrics["cells"]:
        assert (cell["query_space_id"], cell["gallery_space_id"]) == (
            report["spaces"][cell["query"]]["space_id"], report["spaces"][cell["gallery"]]["space_id"])

    # Every row of report.md is one cell, and every number in it is that cell's, formatted.
    rows = _table_rows(paths["markdown"].read_text())
    assert set(rows) == set(roles)
    for cell in metrics["cells"]:
        row = rows[(cell["direction"], cell["name"])]
        ks = [str(k) for k in metrics["ks"]]
        compatible = ("–" if cell["compatible"] is None
                      else " ".join("✓" if cell["compatible"][k] else "✗" for k in ks))
        gaps = ["–" if (cell["gap_recovered"] or {}).get(k) is None else f"{cell['gap_recovered'][k]:.2f}" for k in ks]
        assert row == [cell["role"], *[f"{cell['recall'][k]:.1f}" for k in ks], compatible, *gaps]
    xbt_old = next(c for c in metrics["cells"] if c["name"] == "xbt→old" and c["direction"] == "text→image")
    assert xbt_old["compatible"] is not None and xbt_old["gap_recovered"]["1"] is not None

    text = paths["markdown"].read_text()
    curve = report["backfill"]["text→image"]
    section = text.split("## Backfill with the adapter, text→image")[1].split("\n\n")[1]
    backfill_rows = [line for line in section.splitlines() if not line.startswith(("| ordering", "|---"))]
    assert backfill_rows == [f"| {name} | " + " | ".join(f"{v:.1f}" for v in values["auc"].values()) + " | "
                             + " | ".join(f"{v:.1f}" for v in values["recall"]["1"]) + " |"
                             for name, values in curve["orderings"].items()]


def test_recall_bars_are_coloured_by_role_not_by_name(tmp_path):
    report = json.loads(json.dumps(_report()))
    renamed = json.loads(json.dumps(report).replace('"xbt', '"v3').replace("xbt→", "v3→").replace("→xbt", "→v3"))
    plot_recall_bars(report, tmp_path / "a.png")
    plot_recall_bars(renamed, tmp_path / "b.png")
    recoloured = json.loads(json.dumps(report))
    for cell in recoloured["cells"]:
        if cell["role"] == "compatibility":
            cell["role"] = "baseline"
    plot_recall_bars(recoloured, tmp_path / "c.png")

    def colours(path):
        """The saturated colours of a plot: bars and legend patches (text and axes are black/grey)."""
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
        return {tuple(p) for p in pixels[pixels.max(1) - pixels.min(1) > 60]}

    assert colours(tmp_path / "a.png") == colours(tmp_path / "b.png")  # other names, same roles: same colours
    assert colours(tmp_path / "c.png") != colours(tmp_path / "a.png")  # another role: other colours


def test_approximate_search_adds_exact_recall_and_loss():
    report = _report(SearchConfig("IVF4,Flat", "nprobe=1"))
    cell = report["cells"][0]
    assert cell["recall_loss"] == {k: cell["exact_recall"][k] - cell["recall"][k] for k in ("1", "5", "10")}
    rows = _table_rows(markdown(report))
    assert rows[(cell["direction"], cell["name"])][-3:] == [f"{cell['exact_recall'][k]:.1f}" for k in ("1", "5", "10")]


def test_the_model_card_lists_the_compatibility_cells_by_role(tmp_path):
    """model-index holds the cells whose role is compatibility or blended, whatever they are called."""
    import yaml

    from xbt.model_card import render_model_card

    report = json.loads(json.dumps(_report()))
    for cell in report["cells"]:  # names that say nothing: v3 writes v1's space
        cell["name"] = cell["name"].replace("xbt", "v3").replace("old", "v1")
    report["dataset"]["source"] = "image folder '/home/trainer/private/flickr/test'"  # the trainer's machine
    folder = tmp_path / "adapter"
    (folder / "eval").mkdir(parents=True)
    (folder / "eval" / "metrics.json").write_text(json.dumps(report))
    model = {"reference": "hf:/models/m", "fingerprint": "hf-1234", "embed_dim": 8}
    (folder / "xbt_config.json").write_text(json.dumps({"old_model": model, "new_model": model, "projection": {},
                                                        "lora": {}, "training": {}}))
    meta = yaml.safe_load(render_model_card(folder, repo_id="team/x").split("---")[1])
    listed = [metric["name"] for result in meta["model-index"][0]["results"] for metric in result["metrics"]]
    expected = [f"R@{k} {c['name']}" for d in ("text→image", "image→text") for c in report["cells"]
                if c["direction"] == d and c["role"] == "compatibility" for k in ("1", "5", "10")]
    assert listed == expected == ["R@1 v3→v1", "R@5 v3→v1", "R@10 v3→v1"] * 2
    datasets = {result["dataset"]["name"] for result in meta["model-index"][0]["results"]}
    assert datasets == {"image folder 'test'"}  # the local path is not published


def test_fitted_baselines_get_a_fit_time_column_a_section_with_their_alpha_curves_and_a_plot(tmp_path):
    report = json.loads(json.dumps(_report()))
    curves = {"text→image": {"alphas": [0.0, 0.5, 1.0], "recall": {"1": [10.0, 30.0, 20.0], "5": [40.0, 50.0, 45.0],
                                                                   "10": [60.0, 70.0, 65.0]}},
              "image→text": {"alphas": [0.0, 0.5, 1.0], "recall": {"1": [5.0, 6.0, 7.5], "5": [8.0, 9.0, 10.0],
                                                                   "10": [11.0, 12.0, 13.0]}}}
    report["spaces"]["xbt"].update(kind="blended baseline", fit_seconds=1.25, fit_pairs=40, fit_on=["text"],
                                   alpha={"text→image": 0.5, "image→text": 1.0}, alpha_curve=curves,
                                   runs_old_encoder_on_queries=True)
    report["dataset"]["support"] = {"fraction": 0.2, "seed": 3, "images": 12, "captions": 24, "measured_images": 48}
    paths = write_report(report, tmp_path / "out")
    text = paths["markdown"].read_text()
    rows = _table_rows(text)
    for (direction, name), row in rows.items():
        if direction in ("text→image", "image→text") and "→" in name:
            assert row[-1] == ("1.250" if name.startswith("xbt→") else "–"), name
    assert "support split: 12 images, 24 captions, seed 3" in text
    fitted_row = next(line for line in text.splitlines() if line.startswith("| `xbt` | blended baseline"))
    assert [f.strip() for f in fitted_row.strip("|").split("|")] == [
        "`xbt`", "blended baseline", "text", "40", "1.250", "0.50", "1.00", "yes"]
    for direction, curve in curves.items():
        section = text.split(f"### `xbt` α curve, {direction}")[1].split("\n#")[0]
        alpha_rows = [line for line in section.splitlines() if re.match(r"\| \d", line)]
        assert alpha_rows == [f"| {a:.2f}{' ←' if a == report['spaces']['xbt']['alpha'][direction] else ''} | "
                              + " | ".join(f"{curve['recall'][k][i]:.1f}" for k in ("1", "5", "10")) + " |"
                              for i, a in enumerate(curve["alphas"])]
    assert "alpha_curve" not in text.split("## text→image")[0]  # the curves are not dumped into the space list
    with Image.open(paths["alpha_curve"]) as image:
        assert image.format == "PNG"
        image.verify()
    del report["spaces"]["xbt"]["fit_seconds"]  # nothing fitted: no column, no section, no plot
    plain = write_report(report, tmp_path / "plain")
    assert "alpha_curve" not in plain and "Fitted baselines" not in plain["markdown"].read_text()
