"""Search an OLD gallery with adapter queries, and see what happens to fixed score thresholds.

The old gallery stays as it is: vectors the old model wrote once (here two ``xbt embed``
folders: old-model image vectors and old-model caption vectors). After the upgrade the
queries are encoded by the adapter (``XBTModel``: new model + LoRA + ψ), whose vectors
live in the old space, so one faiss index serves both old and new query encoders::

    xbt embed --model OLD --source photos/ --modality image --output_dir gallery/images
    xbt embed --model OLD --source photos/ --modality text  --output_dir gallery/texts
    python scripts/serve_search_old_gallery.py --adapter ADAPTER --old_model OLD \\
        --image_gallery gallery/images --text_gallery gallery/texts --queries photos/

``--queries`` is an image folder with ``metadata.jsonl`` (``file_name`` and ``captions``
or ``caption``), the ids of the galleries being its file names (what ``xbt embed`` gives
such a folder: images ``NAME``, captions ``NAME#k``). The script prints Recall@K of
text→image and image→text for xbt→old (adapter queries) and, with ``--old_model``,
old→old (what the old model served before the upgrade).

**Ranking, not scale.** An adapter is trained so that the RANKING of old-gallery items for
a query is right; the absolute cosine scores it produces are on another scale than the old
model's (its ψ was fit with a contrastive loss, which only cares about the order). A fixed
similarity threshold tuned on old→old scores ("show a match above 0.28") therefore gives a
different precision and recall on xbt→old. The script measures it: the distribution of
scores of matching and non-matching (caption, image) pairs for both encoders, and the
precision/recall that the threshold chosen on old→old (at ``--threshold_recall``) gives on
xbt→old, next to the threshold that xbt→old needs for the same recall. Re-check every
threshold against the adapter's scores before switching queries over.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from xbt import XBTError, XBTModel, load_backbone
from xbt.retrieval import Labeled, load_embeddings, recall_at_k
from xbt.spaces import check_same_space

KS = (1, 5, 10)


def read_queries(folder: Path) -> tuple[list[Path], list[str], list[str], list[str]]:
    """Image paths with their ids, and every caption with the id of its image."""
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    image_ids = [row["file_name"] for row in rows]
    captions, caption_ids = [], []
    for row in rows:
        texts = row.get("captions") or [row["caption"]]
        captions += texts
        caption_ids += [row["file_name"]] * len(texts)
    return [folder / name for name in image_ids], image_ids, captions, caption_ids


def score_scale(captions: np.ndarray, caption_ids: list[str], images: np.ndarray, image_ids: list[str]) -> dict:
    """Cosine scores of matching / non-matching (caption, image) pairs: mean, std and quantiles."""
    scores = captions @ images.T
    matching = np.asarray(caption_ids)[:, None] == np.asarray(image_ids)[None, :]

    def describe(values: np.ndarray) -> dict:
        return {"mean": round(float(values.mean()), 4), "std": round(float(values.std()), 4),
                **{f"q{q}": round(float(np.quantile(values, q / 100)), 4) for q in (10, 50, 90)}}

    return {"scores": scores, "matching": matching,
            "summary": {"matching": describe(scores[matching]), "non_matching": describe(scores[~matching])}}


def at_threshold(scale: dict, threshold: float) -> dict:
    """Precision and recall (%) of "score ≥ threshold means a match" over all (caption, image) pairs."""
    accepted = scale["scores"] >= threshold
    true = int((accepted & scale["matching"]).sum())
    return {"threshold": round(float(threshold), 4),
            "precision": round(100.0 * true / max(int(accepted.sum()), 1), 2),
            "recall": round(100.0 * true / int(scale["matching"].sum()), 2)}


def threshold_for_recall(scale: dict, recall: float) -> float:
    """The score above which ``recall`` percent of the matching pairs lie."""
    return float(np.quantile(scale["scores"][scale["matching"]], 1.0 - recall / 100.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="the xbt adapter (folder or Hub repo id)")
    parser.add_argument("--image_gallery", required=True, type=Path, help="old-space image vectors (xbt embed folder)")
    parser.add_argument("--text_gallery", required=True, type=Path, help="old-space caption vectors (xbt embed folder)")
    parser.add_argument("--queries", required=True, type=Path, help="image folder with metadata.jsonl (the queries)")
    parser.add_argument("--old_model", help="the old model's reference, for the old→old baseline")
    parser.add_argument("--threshold_recall", type=float, default=90.0,
                        help="fix the score threshold on old→old where it keeps this %% of matching pairs")
    parser.add_argument("--output_json", type=Path, help="also write every number to this file")
    args = parser.parse_args()

    image_gallery, text_gallery = load_embeddings(args.image_gallery), load_embeddings(args.text_gallery)
    adapter = XBTModel.from_pretrained(args.adapter).merge()  # merged: how serving runs
    for gallery, path in ((image_gallery, args.image_gallery), (text_gallery, args.text_gallery)):
        # The adapter writes into its target space; refuse a gallery of any other space (both ids named).
        check_same_space(gallery.space_id, adapter.space_id, f"The adapter {args.adapter}", f"Gallery {path}.")
    text_gallery_images = np.array([label.rsplit("#", 1)[0] for label in text_gallery.labels])  # NAME#k -> NAME

    paths, image_ids, captions, caption_ids = read_queries(args.queries)
    encoders = {"xbt→old": adapter}
    if args.old_model:
        encoders = {"old→old": load_backbone(args.old_model), **encoders}
    rows = {label: row for row, label in enumerate(image_gallery.labels)}
    matching_images = np.asarray(image_gallery.vectors)[[rows[name] for name in image_ids]]  # the image of each id
    report: dict = {"recall": {}, "score_scale": {}, "threshold": {}}
    scales = {}
    for cell, encoder in encoders.items():
        text_queries = encoder.encode_text(captions).numpy()
        image_queries = encoder.encode_image(paths).numpy()
        recall = {"text→image": recall_at_k(Labeled(text_queries, caption_ids), image_gallery, KS),
                  "image→text": recall_at_k(Labeled(image_queries, image_ids),
                                            Labeled(text_gallery.vectors, text_gallery_images), KS)}
        report["recall"][cell] = {direction: {k: round(v, 2) for k, v in values.items()}
                                  for direction, values in recall.items()}
        scales[cell] = score_scale(text_queries, caption_ids, matching_images, image_ids)
        report["score_scale"][cell] = scales[cell]["summary"]

    print("Recall@K (%) against the old gallery:")
    for cell, directions in report["recall"].items():
        for direction, values in directions.items():
            print(f"  {cell:<8} {direction:<11} " + "  ".join(f"R@{k} {v:5.1f}" for k, v in values.items()))
    print("Cosine scores of (caption, its image) vs (caption, another image), text→image:")
    for cell, summary in report["score_scale"].items():
        print(f"  {cell:<8} matching {summary['matching']['mean']:.3f} ± {summary['matching']['std']:.3f}   "
              f"non-matching {summary['non_matching']['mean']:.3f} ± {summary['non_matching']['std']:.3f}")
    if "old→old" in scales:
        fixed = threshold_for_recall(scales["old→old"], args.threshold_recall)
        report["threshold"] = {
            "fixed_on": "old→old", "target_recall": args.threshold_recall,
            "old→old": at_threshold(scales["old→old"], fixed),
            "xbt→old": at_threshold(scales["xbt→old"], fixed),
            "xbt→old recalibrated": at_threshold(scales["xbt→old"],
                                                 threshold_for_recall(scales["xbt→old"], args.threshold_recall)),
        }
        print(f"A threshold fixed on old→old at {args.threshold_recall:.0f}% recall of matching pairs:")
        for name in ("old→old", "xbt→old", "xbt→old recalibrated"):
            values = report["threshold"][name]
            print(f"  {name:<21} threshold {values['threshold']:.3f}: precision {values['precision']:5.1f}%  "
                  f"recall {values['recall']:5.1f}%")
    if args.output_json:
        args.output_json.write_text(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    try:
        main()
    except XBTError as error:  # a wrong gallery, a missing file: one line, not a traceback
        sys.exit(f"serve_search_old_gallery: error: {error}")
