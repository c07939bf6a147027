"""Add new items to an existing OLD-space faiss index with the adapter, then search it.

The index already serves the old gallery (vectors the old model wrote, integer ids). After
the upgrade, new items are encoded by the adapter, whose vectors live in the old space,
and are added to the same index: nothing is re-embedded, the old ids keep their vectors,
and one query encoder (the adapter) searches old and new items together. The adding is
``xbt embed --append_to INDEX`` (called here from Python; the shell command is)::

    xbt embed --model xbt:ADAPTER --source new_items/ --modality image --id_column id \\
        --append_to gallery.faiss --output_dir new_items_vectors/

which checks the index's dimension against the adapter's, refuses ids already in the index,
keeps the new vectors as safetensors shards in ``--output_dir``, and is safe to rerun (an
append that already happened is not repeated). The index must be a ``faiss.IndexIDMap2``
(ids can be added and read back); the new items' folder needs ``metadata.jsonl`` with an
integer id column (``--id_column``; faiss ids are integers) besides ``file_name`` and a caption.

Then the script encodes ``--query`` texts with the adapter and prints the top hits.
Scores are cosines in the old space, but an adapter preserves ranking, not the absolute
scale of the old model's scores: a fixed similarity threshold tuned on old→old scores
must be re-checked (``scripts/serve_search_old_gallery.py`` measures by how much).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import faiss

from xbt import XBTError, XBTModel
from xbt.embed import embed
from xbt.embed_config import EmbedConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, type=Path, help="the old-space faiss IndexIDMap2 file")
    parser.add_argument("--adapter", required=True, help="the xbt adapter (folder or Hub repo id)")
    parser.add_argument("--new_items", required=True, help="image folder with metadata.jsonl of the new items")
    parser.add_argument("--id_column", default="id", help="the integer id column of metadata.jsonl")
    parser.add_argument("--vectors_dir", required=True, help="where xbt embed keeps the new vectors (shards)")
    parser.add_argument("--query", action="append", default=[], help="a text query (repeatable)")
    parser.add_argument("--k", type=int, default=5, help="hits per query")
    parser.add_argument("--output_json", type=Path, help="also write the index size and hits to this file")
    args = parser.parse_args()

    before = faiss.read_index(str(args.index)).ntotal
    embed(EmbedConfig(model=f"xbt:{args.adapter}", source=args.new_items, modality="image",
                      id_column=args.id_column, append_to=str(args.index), output_dir=args.vectors_dir,
                      progress=False))
    index = faiss.read_index(str(args.index))  # the appended index, as a search service would reload it
    print(f"{args.index}: {before} -> {index.ntotal} vectors")

    adapter = XBTModel.from_pretrained(args.adapter).merge()  # merged: how serving runs
    results = []
    if args.query:
        scores, ids = index.search(adapter.encode_text(args.query).numpy(), args.k)
        for query, row_scores, row_ids in zip(args.query, scores, ids):
            hits = [{"id": int(i), "score": round(float(s), 4)} for i, s in zip(row_ids, row_scores) if i >= 0]
            results.append({"query": query, "hits": hits})
            print(f"{query!r}: " + ", ".join(f"{hit['id']} ({hit['score']:.3f})" for hit in hits))
    if args.output_json:
        args.output_json.write_text(json.dumps({"before": before, "after": index.ntotal, "results": results},
                                               indent=2, ensure_ascii=False))


if __name__ == "__main__":
    try:
        main()
    except XBTError as error:  # a wrong index, clashing ids: one line, not a traceback
        sys.exit(f"serve_faiss_append: error: {error}")
