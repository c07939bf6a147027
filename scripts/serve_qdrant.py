"""The vector-database pattern with Qdrant: write with the adapter into the LIVE collection, backfill later, swap an alias.

Steps, each a subcommand, run at different times in the life of a search service::

    # today: the live collection holds old-model vectors; the service queries the alias "gallery"
    serve_qdrant.py --qdrant db/ create --collection gallery_v1 --alias gallery --vectors old_vectors/
    # upgrade day: new items are encoded by the adapter straight into the live old-space collection
    serve_qdrant.py --qdrant db/ add --alias gallery --adapter ADAPTER --images new_items/
    serve_qdrant.py --qdrant db/ search --alias gallery --adapter ADAPTER --text "a red circle"
    # later, at leisure: re-embed everything into a new collection (the new model's own space) ...
    serve_qdrant.py --qdrant db/ backfill --collection gallery_v2 --adapter ADAPTER --images all_items/
    # ... and switch the service over in one atomic alias swap (gallery_v1 stays, for a rollback)
    serve_qdrant.py --qdrant db/ swap --alias gallery --collection gallery_v2

``create`` reads an ``xbt embed`` folder (the old model's vectors of the existing items).
``add`` needs no re-index: the adapter's vectors live in the old space, so they go into the
collection that is being served, beside the old ones. ``backfill`` writes a new collection in
``--space source`` (the new model's own space, the adapter switched off) or ``--space full``
(a BT²-style ψ's whole old+extra vector). Every collection records its space id in its
metadata; ``add``/``search``/``evaluate`` read the space of the collection the alias points to
and encode queries into that space (target, source or full), so queries switch with the
alias, and a write into a collection of another space is refused.

``--qdrant PATH`` runs Qdrant's client in local mode (embedded, on disk; ``:memory:`` for a
throw-away one). ``--url http://host:6333`` talks to a Qdrant server or cluster: the client
code below is the same (collection metadata needs Qdrant server 1.16 or later).

Scores are cosines, but an adapter preserves ranking, not the absolute scale of the old
model's scores: re-check fixed thresholds (``score_threshold``) before switching queries over
(``scripts/serve_search_old_gallery.py`` measures by how much). The same holds inside the live
collection: adapter queries score adapter-written items on another scale than old-written ones,
and ``evaluate`` reports recall for the items of each writer; ``--fuse`` searches the
adapter-written and the other items apart and merges the two lists by reciprocal rank (Qdrant
prefetch + RRF, one request), so each kind of item is ranked only against its own kind.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

import numpy as np
from qdrant_client import QdrantClient, models

from xbt import XBTError, XBTModel
from xbt.embed import read_embeddings_dir

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
BATCH = 256


def point_id(item_id: str) -> str:
    """Qdrant point ids are integers or UUIDs; the item's string id becomes a stable UUID (kept in the payload)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, item_id))


def write_points(client: QdrantClient, collection: str, ids: list[str], vectors: np.ndarray, writer: str) -> None:
    for start in range(0, len(ids), BATCH):
        chunk = ids[start:start + BATCH]
        client.upsert(collection, points=models.Batch(
            ids=[point_id(i) for i in chunk], vectors=vectors[start:start + BATCH].tolist(),
            payloads=[{"item_id": i, "written_by": writer} for i in chunk]))


def new_collection(client: QdrantClient, name: str, dim: int, space_id: str) -> None:
    if client.collection_exists(name):
        raise SystemExit(f"serve_qdrant: error: collection {name!r} exists already; choose a new name.")
    client.create_collection(name, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
                             metadata={"space_id": space_id})


def resolve(client: QdrantClient, alias: str) -> str:
    """The collection an alias points to now."""
    for description in client.get_aliases().aliases:
        if description.alias_name == alias:
            return description.collection_name
    raise SystemExit(f"serve_qdrant: error: no alias {alias!r}.")


def space_of(adapter: XBTModel, space_id: str) -> str:
    """Which of the adapter's spaces (``space=`` of encode_*) writes vectors of ``space_id``."""
    spaces = {adapter.space_id: "target", adapter.source_space_id: "source", adapter.full_space_id: "full"}
    if space_id not in spaces:
        raise SystemExit(f"serve_qdrant: error: the collection holds vectors of space {space_id}; the adapter "
                         f"writes {adapter.space_id} (target), {adapter.source_space_id} (source) or "
                         f"{adapter.full_space_id} (full).")
    return spaces[space_id]


def image_files(folder: Path) -> tuple[list[str], list[Path]]:
    """Ids (relative file names, as ``xbt embed`` names them) and paths of the images under ``folder``."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return [p.relative_to(folder).as_posix() for p in paths], paths


def target_of_alias(client: QdrantClient, alias: str, adapter: XBTModel) -> tuple[str, str]:
    """The collection behind ``alias`` and the adapter space that matches it."""
    collection = resolve(client, alias)
    return collection, space_of(adapter, client.get_collection(collection).config.metadata["space_id"])


def request(query: np.ndarray, k: int, fuse_writer: str | None) -> models.QueryRequest:
    """A nearest-neighbour query; with ``fuse_writer``, one search among that writer's items and one among the
    others, merged by reciprocal rank (each kind of item is ranked only against its own kind)."""
    if fuse_writer is None:
        return models.QueryRequest(query=query.tolist(), limit=k, with_payload=True)
    by_writer = models.FieldCondition(key="written_by", match=models.MatchValue(value=fuse_writer))
    prefetch = [models.Prefetch(query=query.tolist(), limit=k, filter=models.Filter(must=[by_writer])),
                models.Prefetch(query=query.tolist(), limit=k, filter=models.Filter(must_not=[by_writer]))]
    return models.QueryRequest(prefetch=prefetch, query=models.FusionQuery(fusion=models.Fusion.RRF), limit=k,
                               with_payload=True)


def search(client: QdrantClient, collection: str, queries: np.ndarray, k: int, fuse_writer: str | None) -> list:
    """The hits (ScoredPoint lists) of each query, in one batch request."""
    responses = client.query_batch_points(collection, requests=[request(q, k, fuse_writer) for q in queries])
    return [response.points for response in responses]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--qdrant", help="local mode: a folder (or :memory:)")
    where.add_argument("--url", help="a Qdrant server or cluster, e.g. http://localhost:6333")
    steps = parser.add_subparsers(dest="step", required=True)
    create = steps.add_parser("create", help="a collection from an xbt embed folder, and an alias to it")
    create.add_argument("--collection", required=True)
    create.add_argument("--alias", required=True)
    create.add_argument("--vectors", required=True, type=Path, help="xbt embed folder (e.g. the old gallery)")
    add = steps.add_parser("add", help="the adapter writes new items into the collection behind the alias")
    backfill = steps.add_parser("backfill", help="re-embed all items into a new collection")
    backfill.add_argument("--collection", required=True)
    backfill.add_argument("--space", choices=("source", "full"), default="source",
                          help="source: the new model's own space; full: ψ's old+extra dims")
    for step in (add, backfill):
        step.add_argument("--adapter", required=True)
        step.add_argument("--images", required=True, type=Path, help="folder of images (ids: relative file names)")
    add.add_argument("--alias", required=True)
    swap = steps.add_parser("swap", help="point the alias at another collection (atomic)")
    swap.add_argument("--alias", required=True)
    swap.add_argument("--collection", required=True)
    query = steps.add_parser("search", help="text queries through the alias")
    query.add_argument("--text", action="append", required=True)
    evaluate = steps.add_parser("evaluate", help="Recall@K of captions through the alias, per writer of the item")
    evaluate.add_argument("--queries", required=True, type=Path, help="image folder with metadata.jsonl")
    for step in (query, evaluate):
        step.add_argument("--alias", required=True)
        step.add_argument("--adapter", required=True)
        step.add_argument("--k", type=int, default=10)
        step.add_argument("--fuse", action="store_true",
                          help="search adapter-written and other items apart, merge by reciprocal rank")
    parser.add_argument("--output_json", type=Path, help="also write what the step reports to this file")
    args = parser.parse_args()

    client = QdrantClient(path=args.qdrant) if args.qdrant else QdrantClient(url=args.url)
    report: dict = {"step": args.step}
    if args.step == "create":
        vectors, ids, manifest = read_embeddings_dir(args.vectors)
        new_collection(client, args.collection, manifest["dim"], manifest["space_id"])
        write_points(client, args.collection, ids, vectors, writer=",".join(manifest["model_ids"]))
        client.update_collection_aliases(change_aliases_operations=[models.CreateAliasOperation(
            create_alias=models.CreateAlias(collection_name=args.collection, alias_name=args.alias))])
        report.update(collection=args.collection, count=len(ids), space_id=manifest["space_id"])
    elif args.step == "add":
        adapter = XBTModel.from_pretrained(args.adapter)
        collection, space = target_of_alias(client, args.alias, adapter)
        ids, paths = image_files(args.images)
        write_points(client, collection, ids, adapter.encode_image(paths, space=space).numpy(), adapter.model_id)
        report.update(collection=collection, space=space, added=len(ids))
    elif args.step == "backfill":
        adapter = XBTModel.from_pretrained(args.adapter)
        space_id = {"source": adapter.source_space_id, "full": adapter.full_space_id}[args.space]
        ids, paths = image_files(args.images)
        vectors = adapter.encode_image(paths, space=args.space).numpy()
        new_collection(client, args.collection, vectors.shape[1], space_id)
        write_points(client, args.collection, ids, vectors, f"{adapter.model_id}:{args.space}")
        report.update(collection=args.collection, space=args.space, space_id=space_id, count=len(ids))
    elif args.step == "swap":
        previous = resolve(client, args.alias)
        # Delete + create in one request: every query sees either the old or the new collection.
        client.update_collection_aliases(change_aliases_operations=[
            models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=args.alias)),
            models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=args.collection,
                                                                        alias_name=args.alias))])
        report.update(alias=args.alias, previous=previous, collection=args.collection)
    else:
        adapter = XBTModel.from_pretrained(args.adapter)
        collection, space = target_of_alias(client, args.alias, adapter)
        report.update(collection=collection, space=space)
        fuse_writer = adapter.model_id if args.fuse else None
        if args.step == "search":
            queries = adapter.encode_text(args.text, space=space).numpy()
            report["results"] = [{"query": text, "hits": [
                {"item_id": p.payload["item_id"], "score": round(p.score, 4), "written_by": p.payload["written_by"]}
                for p in points]} for text, points in zip(args.text, search(client, collection, queries, args.k,
                                                                             fuse_writer))]
        else:
            rows = [json.loads(line) for line in (args.queries / "metadata.jsonl").read_text().splitlines() if line]
            captions = [(row["file_name"], text) for row in rows for text in row.get("captions") or [row["caption"]]]
            queries = adapter.encode_text([text for _, text in captions], space=space).numpy()
            writer_of = {p.payload["item_id"]: p.payload["written_by"]
                         for p in client.retrieve(collection, [point_id(row["file_name"]) for row in rows])}
            hits: dict[str, list[bool]] = {}
            for (item_id, _), points in zip(captions, search(client, collection, queries, args.k, fuse_writer)):
                hits.setdefault(writer_of[item_id], []).append(any(p.payload["item_id"] == item_id for p in points))
            report["recall"] = {writer: round(100.0 * float(np.mean(found)), 2) for writer, found in hits.items()}
            report["recall"]["all"] = round(100.0 * float(np.mean(sum(hits.values(), []))), 2)
            report["k"] = args.k
    print(json.dumps(report, indent=2, ensure_ascii=False))
    if args.output_json:
        args.output_json.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    client.close()


if __name__ == "__main__":
    try:
        main()
    except XBTError as error:
        sys.exit(f"serve_qdrant: error: {error}")
