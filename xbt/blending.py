"""Query blending fitted on held-out pairs: how much of the old encoder's query to mix into the adapter's.

A client that can still run the old encoder on its queries can search the old gallery
with a point on the great circle between the adapter's query and the old encoder's query
of the same text (text→image) or image (image→text). The weight ``blend_old`` (0: the
adapter alone, 1: the old encoder alone) is fitted per direction on **support pairs held
out from training**: the weight with the best support Recall@K at the first K (ties: the
higher mean over K, then the smaller weight), over the grid 0, 0.05, ..., 1. The result is
recorded in the adapter (``query_blending``: weights, the whole curve, the support) and used
by ``encode_text/encode_image(blend_old="fitted")`` and by ``xbt eval``'s blended cells; a
number passed instead overrides it. Blending runs the old encoder on every query.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

METHOD = "slerp"


def fit_query_blending(model, old_encoder, support: str | Path, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, Any]:
    """Fit ``blend_old`` per direction for ``model`` (an ``XBTModel``) on the pairs of ``support``.

    ``old_encoder`` is the encoder of the adapter's target space (the old model, or the adapter a chained
    upgrade was trained against). ``support`` is any image–text source ``xbt eval`` reads; its pairs must not
    be training pairs.
    """
    from .evaluation import load_eval_set
    from .evaluation.fitted import ALPHAS, alpha_curve, best_alpha
    from .retrieval import Labeled
    from .spaces import check_same_space

    check_same_space(model.space_id, old_encoder.space_id, "The old encoder for query blending")
    pairs = load_eval_set(support)
    images = pairs.load_images(range(len(pairs.ids)))
    vectors = {(who, modality): (encoder.encode_text(pairs.texts) if modality == "text"
                                 else encoder.encode_image(images)).numpy()
               for who, encoder in (("adapter", model), ("old", old_encoder)) for modality in ("text", "image")}
    labels = {"text": pairs.caption_ids, "image": np.asarray(pairs.ids)}
    fitted: dict[str, Any] = {"method": METHOD, "blend_old": {}, "curve": {},
                              "support": {"source": str(support), "images": len(pairs.ids),
                                          "captions": len(pairs.texts)}}
    for direction, (query, gallery) in {"text→image": ("text", "image"), "image→text": ("image", "text")}.items():
        # alpha_curve walks from its first argument (α = 0) to its second: here from the adapter to the old query
        curve = alpha_curve(Labeled(vectors[("adapter", query)], labels[query]),
                            Labeled(vectors[("old", query)], labels[query]),
                            Labeled(vectors[("old", gallery)], labels[gallery]), ALPHAS, ks)
        fitted["blend_old"][direction] = best_alpha(ALPHAS, curve)
        fitted["curve"][direction] = {"blend_old": list(ALPHAS), "recall": {str(k): v for k, v in curve.items()}}
    logger.info("Query blending fitted on %d support images: blend_old %s", len(pairs.ids), fitted["blend_old"])
    return fitted
