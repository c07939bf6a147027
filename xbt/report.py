"""Evaluation report: metrics.json, a Markdown table and PNG plots (matrix heatmap, backfill curve, recall bars).

The report is a plain JSON-serialisable dict (see :func:`cells_to_json` and
:func:`xbt.evaluation.evaluate`), so a team can diff runs or feed them to a dashboard:

    {"xbt_version", "spaces": {name: {"kind", "space_id", "model_id", "dim", "modalities", ...}},
     "dataset": {...}, "search": {...}, "ks": [1, 5, 10],
     "cells": [{"direction", "query", "gallery", "name", "role", "query_space_id", "gallery_space_id",
                "recall": {"1": ...}, "compatible", "gap_recovered", "exact_recall", "recall_loss"}, ...],
     "backfill": {"text→image": {"query", "gallery", "reembedded_by", "seed", "orderings": {"random": {
         "fractions", "replaceable", "merge", "recall": {"1": [...]}, "auc": {"1": ...}}, "hubness": ...}}},
     "backfill_new_model": {...the same, re-embedded by the new model: two indexes, rank merge...}}

Baselines fitted while evaluating (:mod:`xbt.evaluation.fitted`) record their fit in their space entry
(``fit_seconds``, ``fit_pairs``; SLERP also ``alpha`` and ``alpha_curve`` per direction:
``{"alphas": [...], "recall": {"1": [...]}}`` on the support split) and the split in ``dataset.support``;
the report gives them a fit-time column, a section of their own and the α-curve plot.

Everything here reads a cell's ``role`` (:data:`xbt.evaluation.plan.ROLES`), never its space names:
the lower-bound line of the bar plot, the colours, the columns of the table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .evaluation.plan import DIRECTIONS, LOWER_BOUND, ROLES  # noqa: E402
from .evaluation.published import describe as describe_published  # noqa: E402
from .io import atomic_write_text  # noqa: E402
from .retrieval import CellResult  # noqa: E402

logger = logging.getLogger(__name__)

PLOTS = {"matrix": "matrix.png", "backfill": "backfill.png", "recall_bars": "recall_bars.png",
         "alpha_curve": "alpha_curve.png"}
ROLE_COLOURS = {role: f"C{number}" for number, role in enumerate(ROLES)}


def _per_k(values: dict | None) -> dict[str, object] | None:
    return None if values is None else {str(k): v for k, v in values.items()}


def cells_to_json(cells: list[CellResult]) -> list[dict]:
    """Cells as JSON objects (K as string keys); approximate searches get ``recall_loss`` = exact − approximate."""
    out = []
    for cell in cells:
        entry = {"direction": cell.direction, "query": cell.query, "gallery": cell.gallery, "name": cell.name,
                 "role": cell.role, "query_space_id": cell.query_space_id, "gallery_space_id": cell.gallery_space_id,
                 "recall": _per_k(cell.recall), "compatible": _per_k(cell.compatible),
                 "gap_recovered": _per_k(cell.gap_recovered), **cell.extra}
        if cell.exact_recall is not None:
            entry["exact_recall"] = _per_k(cell.exact_recall)
            entry["recall_loss"] = {str(k): cell.exact_recall[k] - cell.recall[k] for k in cell.recall}
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------
def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "✓" if value else "✗"
    return f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    """The report as Markdown: spaces, data, one matrix table per direction, the backfill table."""
    ks = [str(k) for k in report["ks"]]
    lines = ["# Cross-model retrieval evaluation", ""]
    for name, info in report.get("spaces", {}).items():
        described = ", ".join(f"{key} `{value}`" for key, value in info.items()
                              if key != "kind" and value is not None and not isinstance(value, dict))
        lines.append(f"- **{name}** ({info.get('kind', 'space')}): {described}")
    dataset = report.get("dataset", {})
    if dataset:
        lines.append("- **data**: " + ", ".join(f"{key} {value}" for key, value in dataset.items()
                                               if not isinstance(value, (dict, list))))
    for name, stored in dataset.get("stored", {}).items():
        lines.append(f"- **stored {name}**: {stored['items']} vectors of dimension {stored['dim']}")
    search = report.get("search", {})
    lines += [f"- **search**: {', '.join(f'{k} {v}' for k, v in search.items())}", ""]
    lines += ["Recall@K in percent. *compatible*: beats the lower bound (the old model searching its own "
              "gallery) at that K. *gap*: share of the gap between the lower and the upper bound (the new model "
              "in its own space) recovered, (R − R(lower)) / (R(upper) − R(lower)).", ""]
    approximate = any("exact_recall" in cell for cell in report["cells"])
    fitted = _fitted(report)
    published_k = str(report["published"]["k"]) if report.get("published") else None
    if published_k:
        lines += [describe_published(report), ""]
    for direction in DIRECTIONS:
        cells = [cell for cell in report["cells"] if cell["direction"] == direction]
        if not cells:
            continue
        header = ["cell", "role"] + [f"R@{k}" for k in ks] + ["compatible"] + [f"gap@{k}" for k in ks]
        if approximate:
            header += [f"exact R@{k}" for k in ks]
        if fitted:
            header.append("fit (s)")
        if published_k:
            header.append(f"published R@{published_k}")
        lines += [f"## {direction}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for cell in cells:
            compatible = cell["compatible"]
            row = [f"`{cell['name']}`", str(cell.get("role") or "–")] + [_fmt(cell["recall"][k]) for k in ks]
            row.append("–" if compatible is None else " ".join(_fmt(compatible[k]) for k in ks))
            gap = cell["gap_recovered"] or {}
            row += [_fmt(gap.get(k), 2) for k in ks]
            if approximate:
                exact = cell.get("exact_recall") or {}
                row += [_fmt(exact.get(k)) for k in ks]
            if fitted:
                row.append(_fmt(fitted.get(cell["query"], {}).get("fit_seconds"), 3))
            if published_k:
                row.append(_fmt(cell.get("published", {}).get(published_k), 2))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += _fitted_markdown(report, fitted, ks)
    for key, curves in _backfills(report):
        for direction, curve in curves.items():
            orderings = curve["orderings"]
            first = next(iter(orderings.values()))
            k = next(iter(first["recall"]))
            lines += [f"## {BACKFILLS[key]}, {direction} (queries `{curve['query']}`, gallery `{curve['gallery']}` "
                      f"re-embedded by `{curve['reembedded_by']}`, {first['merge']} merge, {first['replaceable']} "
                      f"items, seed {curve['seed']})", "",
                      "| ordering | " + " | ".join(f"AUC R@{key_k}" for key_k in first["auc"]) + " | "
                      + " | ".join(f"R@{k} p={p:.1f}" for p in first["fractions"]) + " |",
                      "|---|" + "---|" * (len(first["auc"]) + len(first["fractions"]))]
            for name, values in orderings.items():
                lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in values["auc"].values()) + " | "
                             + " | ".join(_fmt(v) for v in values["recall"][k]) + " |")
            lines.append("")
    return "\n".join(lines)


BACKFILLS = {"backfill": "Backfill with the adapter", "backfill_new_model": "Backfill with the new model"}


def _backfills(report: dict) -> list[tuple[str, dict]]:
    """The report's non-empty backfill sections, (key, {direction: curve})."""
    return [(key, report[key]) for key in BACKFILLS if report.get(key)]


def _fitted(report: dict) -> dict[str, dict]:
    """The spaces fitted while evaluating (those recording a fit time), by name."""
    return {name: info for name, info in report.get("spaces", {}).items() if "fit_seconds" in info}


def _fitted_markdown(report: dict, fitted: dict[str, dict], ks: list[str]) -> list[str]:
    """The fitted baselines: what each was fitted on and how long it took, SLERP's α and its curves."""
    if not fitted:
        return []
    support = report.get("dataset", {}).get("support", {})
    lines = [f"## Fitted baselines (support split: {support.get('images')} images, {support.get('captions')} "
             f"captions, seed {support.get('seed')}; left out of every cell above)", "",
             "| baseline | kind | fitted on | pairs | fit (s) | "
             + " | ".join(f"α {d}" for d in DIRECTIONS) + " | runs the old encoder on queries |",
             "|" + "---|" * (6 + len(DIRECTIONS))]
    for name, info in fitted.items():
        alpha = info.get("alpha", {})
        lines.append(f"| `{name}` | {info['kind']} | {', '.join(info.get('fit_on', ['text']))} | {info['fit_pairs']} | "
                     f"{_fmt(info['fit_seconds'], 3)} | " + " | ".join(_fmt(alpha.get(d), 2) for d in DIRECTIONS)
                     + f" | {'yes' if info.get('runs_old_encoder_on_queries') else 'no'} |")
    lines += ["", "α: weight of the aligned new query (0: the old model's query, 1: the Procrustes-aligned new "
              "query), chosen per direction as the best support R@K at the first K.", ""]
    for name, info in fitted.items():
        for direction, curve in info.get("alpha_curve", {}).items():
            lines += [f"### `{name}` α curve, {direction} (support split)", "",
                      "| α | " + " | ".join(f"R@{k}" for k in curve["recall"]) + " |",
                      "|---|" + "---|" * len(curve["recall"])]
            for index, alpha in enumerate(curve["alphas"]):
                chosen = " ←" if alpha == info["alpha"][direction] else ""
                lines.append(f"| {alpha:.2f}{chosen} | "
                             + " | ".join(_fmt(values[index]) for values in curve["recall"].values()) + " |")
            lines.append("")
    return lines


# ---------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------
def _directions(report: dict) -> list[str]:
    return [d for d in DIRECTIONS if any(cell["direction"] == d for cell in report["cells"])]


def plot_matrix(report: dict, path: Path, k: int | None = None) -> None:
    """Heatmap of Recall@k, query spaces × gallery spaces, one panel per direction (blank = not evaluated)."""
    k = str(k or report["ks"][0])
    directions = _directions(report)
    figure, axes = plt.subplots(1, len(directions), figsize=(5.5 * len(directions), 4.5), squeeze=False)
    for axis, direction in zip(axes[0], directions):
        cells = [cell for cell in report["cells"] if cell["direction"] == direction]
        queries = list(dict.fromkeys(cell["query"] for cell in cells))
        galleries = list(dict.fromkeys(cell["gallery"] for cell in cells))
        grid = np.full((len(queries), len(galleries)), np.nan)
        for cell in cells:
            grid[queries.index(cell["query"]), galleries.index(cell["gallery"])] = cell["recall"][k]
        top = max(1.0, float(np.nanmax(grid)))
        image = axis.imshow(grid, cmap="viridis", vmin=0, vmax=top)
        for (row, column), value in np.ndenumerate(grid):
            if not np.isnan(value):  # dark text on the bright end of viridis
                axis.text(column, row, f"{value:.1f}", ha="center", va="center", fontsize=9,
                          color="black" if value > 0.6 * top else "white")
        axis.set_xticks(range(len(galleries)), galleries, rotation=30, ha="right")
        axis.set_yticks(range(len(queries)), queries)
        axis.set_xlabel("gallery space")
        axis.set_ylabel("query space")
        axis.set_title(f"{direction}, R@{k} (%)")
        figure.colorbar(image, ax=axis, shrink=0.8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_backfill(report: dict, path: Path) -> None:
    """R@1 against the re-embedded fraction p: one panel per direction, one colour per ordering, solid for
    the adapter's backfill, dashed for the new model's; the legend gives each curve's AUC."""
    figure, axes = plt.subplots(1, len(DIRECTIONS), figsize=(11, 4.5), squeeze=False)
    for axis, direction in zip(axes[0], DIRECTIONS, strict=True):
        for key, curves in _backfills(report):
            curve = curves.get(direction)
            for number, (name, values) in enumerate((curve or {}).get("orderings", {}).items()):
                k = next(iter(values["recall"]))
                axis.plot(values["fractions"], values["recall"][k], color=f"C{number}", marker="o", markersize=3,
                          linestyle="-" if key == "backfill" else "--",
                          label=f"{name}, {curve['reembedded_by']} ({values['merge']}): AUC {values['auc'][k]:.1f}")
        axis.set_title(f"Backfill, {direction}")
        axis.set_xlabel("fraction of the gallery re-embedded (p)")
        axis.set_ylabel("Recall@1 (%)")
        axis.set_xlim(0, 1)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_recall_bars(report: dict, path: Path) -> None:
    """Every cell's Recall@K, one panel per direction: one group per cell, bars coloured by the cell's role
    (K from light to dark), the lower-bound cell's R@K as dashed lines."""
    directions = _directions(report)
    ks = [str(k) for k in report["ks"]]
    figure, axes = plt.subplots(len(directions), 1, figsize=(9, 3.8 * len(directions)), squeeze=False)
    for axis, direction in zip(axes[:, 0], directions):
        cells = [cell for cell in report["cells"] if cell["direction"] == direction]
        width = 0.8 / len(ks)
        positions = np.arange(len(cells))
        colours = [ROLE_COLOURS.get(cell.get("role"), "grey") for cell in cells]
        for offset, k in enumerate(ks):
            axis.bar(positions + offset * width, [cell["recall"][k] for cell in cells], width, color=colours,
                     alpha=0.45 + 0.55 * (offset + 1) / len(ks), edgecolor="black", linewidth=0.3)
        for cell in cells:
            if cell.get("role") == LOWER_BOUND:
                for k in ks:
                    axis.axhline(cell["recall"][k], color=ROLE_COLOURS[LOWER_BOUND], linestyle="--", linewidth=0.8)
        axis.set_xticks(positions + 0.4 - width / 2, [cell["name"] for cell in cells], rotation=30, ha="right")
        axis.set_ylabel(f"Recall@K (%), K = {', '.join(ks)}")
        axis.set_title(f"{direction} (dashed: lower bound at each K)")
        roles = list(dict.fromkeys(cell.get("role") for cell in cells))
        axis.legend(handles=[matplotlib.patches.Patch(color=ROLE_COLOURS.get(role, "grey"), label=str(role))
                             for role in roles], fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_alpha_curves(report: dict, path: Path) -> None:
    """Support recall against SLERP's α, one line per space, direction and K; the fitted α as a marker."""
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for name, info in _fitted(report).items():
        for direction, curve in info.get("alpha_curve", {}).items():
            for k, values in curve["recall"].items():
                (line,) = axis.plot(curve["alphas"], values, label=f"{name} {direction} R@{k}")
                chosen = curve["alphas"].index(info["alpha"][direction])
                axis.plot(curve["alphas"][chosen], values[chosen], marker="o", color=line.get_color())
    axis.set_xlabel("α (0: old query, 1: aligned new query)")
    axis.set_ylabel("support Recall@K (%)")
    axis.set_title("SLERP α curves (dots: the fitted α)")
    axis.set_xlim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(report: dict, output: str | Path) -> dict[str, Path]:
    """Write metrics.json, report.md and the PNG plots into ``output``; returns their paths by kind."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": output / "metrics.json", "markdown": output / "report.md"}
    atomic_write_text(paths["metrics"], json.dumps(report, indent=2, ensure_ascii=False))
    atomic_write_text(paths["markdown"], markdown(report))
    plot_matrix(report, output / PLOTS["matrix"])
    plot_recall_bars(report, output / PLOTS["recall_bars"])
    paths.update(matrix=output / PLOTS["matrix"], recall_bars=output / PLOTS["recall_bars"])
    if _backfills(report):
        plot_backfill(report, output / PLOTS["backfill"])
        paths["backfill"] = output / PLOTS["backfill"]
    if any("alpha_curve" in info for info in _fitted(report).values()):
        plot_alpha_curves(report, output / PLOTS["alpha_curve"])
        paths["alpha_curve"] = output / PLOTS["alpha_curve"]
    logger.info("Report written to %s", output)
    return paths
