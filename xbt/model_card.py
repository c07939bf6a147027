"""Model cards for adapter directories, rendered from what the directory records.

The card is filled from ``xbt_config.json`` (models, fingerprints, ψ and LoRA
configs, training summary) and, when present, ``eval/metrics.json``: its tables are
the evaluation report's own Markdown, and its compatibility cells (role ``compatibility``
or ``blended``: the adapter's queries against the gallery of the space it writes into)
become the ``model-index`` metadata the Hub displays. Cells are chosen by role, never by name.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from string import Template
from typing import Any

import yaml

from .evaluation.plan import BLENDED_ROLE, COMPATIBILITY, DIRECTIONS
from .io import atomic_write_text

TEMPLATE = "adapter.md"
CARD_ROLES = (COMPATIBILITY, BLENDED_ROLE)


def _model_index(name: str, metrics: dict[str, Any]) -> list[dict]:
    dataset = metrics.get("dataset", {})
    results = []
    for direction in DIRECTIONS:
        cells = [c for c in metrics.get("cells", []) if c["direction"] == direction and c.get("role") in CARD_ROLES]
        if not cells:
            continue
        results.append({
            "task": {"type": "text-to-image-retrieval" if direction == "text→image" else "image-to-text-retrieval",
                     "name": f"{direction} retrieval against the gallery of the old space"},
            "dataset": {"type": "custom", "name": str(dataset.get("source", "evaluation set")),
                        "revision": str(dataset.get("fingerprint", ""))},
            "metrics": [{"type": f"recall_at_{k}", "name": f"R@{k} {cell['name']}", "value": round(value, 2)}
                        for cell in cells for k, value in cell["recall"].items()],
        })
    return [{"name": name, "results": results}] if results else []


def _bullets(values: dict[str, Any] | None) -> str:
    if not values:
        return "Not recorded."
    return "\n".join(f"- **{key}**: `{json.dumps(value) if isinstance(value, (dict, list)) else value}`"
                     for key, value in values.items())


def render_model_card(folder: str | Path, repo_id: str | None = None) -> str:
    """The model card of an adapter directory as Markdown with YAML front matter."""
    folder = Path(folder)
    config = json.loads((folder / "xbt_config.json").read_text())
    metrics_path = folder / "eval" / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    old, new = config["old_model"], config["new_model"]
    name = repo_id or folder.name

    front_matter: dict[str, Any] = {"library_name": "xbt", "tags": ["xbt", "clip", "backward-compatible", "lora",
                                                                    "retrieval"], "license": "apache-2.0"}
    if new["reference"].startswith("hf:") and not Path(new["reference"][3:]).is_absolute():
        front_matter["base_model"] = new["reference"][3:]
    if metrics:
        front_matter["model-index"] = _model_index(name, metrics)

    if metrics:
        from .report import markdown

        evaluation = markdown(metrics).split("\n", 1)[1].strip()  # drop the report's own title
        evaluation += "\n\nPlots: `eval/` (matrix heatmap, backfill curve, recall bars)."
    else:
        evaluation = "Not evaluated yet: run `xbt eval` with this adapter and push again."

    template = Template((files("xbt.model_cards") / TEMPLATE).read_text(encoding="utf-8"))
    return template.substitute(
        front_matter=yaml.safe_dump(front_matter, sort_keys=False, allow_unicode=True).strip(),
        title=f"xbt adapter: {name}",
        repo_id=repo_id or str(folder),
        old_reference=old["reference"], old_fingerprint=old["fingerprint"], old_dim=old["embed_dim"],
        new_reference=new["reference"], new_fingerprint=new["fingerprint"], new_dim=new["embed_dim"],
        source_space=config.get("source_space"), target_space=config.get("target_space"),
        adapter=_bullets({"projection": _projection_config(Path(folder)), "lora": config.get("lora")}),
        training=_bullets(config.get("training")),
        evaluation=evaluation,
    )


def _projection_config(folder: Path) -> dict[str, Any] | None:
    """ψ's own config (``projection/config.json``, as stage 1 writes it)."""
    path = folder / "projection" / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_model_card(folder: str | Path, repo_id: str | None = None) -> Path:
    """Render and write ``README.md`` into the adapter directory; returns its path."""
    return atomic_write_text(Path(folder) / "README.md", render_model_card(folder, repo_id))
