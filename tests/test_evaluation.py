"""End to end on a generated image folder with real PNGs and tiny real models: spaces, cache, stored galleries, CLI."""

import json

import faiss
import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from xbt import InputError, load_backbone
from xbt.cache import EmbeddingCache, build_cache, text_source
from xbt.cli import main as cli
from xbt.demo.models import TinyClipConfig, build_hf_clip
from xbt.errors import FingerprintMismatchError
from xbt.evaluation import EvalConfig, evaluate, load_eval_set
from xbt.baselines import fit_baseline, fit_procrustes
from xbt.evaluation.encode import (
    adapter_space,
    apply_projection,
    blended_space,
    denoised_space,
    encoder_space,
    native_space,
    projected_space,
)
from xbt.evaluation.fitted import ALPHAS, best_alpha, fitted_space, slerp, slerp_space, support_ids
from xbt.evaluation.plan import (
    ADAPTER,
    BASELINE,
    BLENDED,
    DENOISED,
    NEW_MODEL,
    OLD_MODEL,
    Space,
    plan_cells,
)
from xbt.projection import Projection
from xbt.retrieval import Labeled, recall_at_k

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")
KS = (1, 5, 10)


def write_image_folder(folder, count, seed=0, first_id=None):
    """Shapes on noise saved as PNGs, 1-3 captions each (identical captions recur across images)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for number in range(count):
        colour, shape = list(COLOURS)[rng.integers(4)], SHAPES[rng.integers(2)]
        image = Image.fromarray(rng.integers(0, 60, (40, 40, 3), dtype=np.uint8))
        top, left = (int(v) for v in rng.integers(0, 20, 2))
        draw = ImageDraw.Draw(image)
        (draw.rectangle if shape == "square" else draw.ellipse)([left, top, left + 18, top + 18], fill=COLOURS[colour])
        name = f"{number:05d}.png"
        image.save(folder / name)
        captions = [f"a {colour} {shape}", f"a {shape} that is {colour}",
                    f"a {colour} {shape} near the {'top' if top < 10 else 'bottom'}"][: 1 + number % 3]
        entry = {"file_name": name, "captions": captions}
        if first_id is not None:
            entry["id"] = first_id + 7 * number
        lines.append(json.dumps(entry))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


class ProjectedModel:
    """A stand-in adapter made of real parts (new backbone + projection into the old space), an xbt.spaces.Encoder."""

    def __init__(self, new, old, projection):
        self.new, self.old, self.projection = new, old, projection
        self.calls = 0
        self.dim, self.space_id, self.model_id = projection.old_dim, old.space_id, "projected-stand-in"

    def encode_text(self, texts):
        self.calls += 1
        with torch.no_grad():
            return self.projection(self.new.encode_text(texts))

    def encode_image(self, images):
        self.calls += 1
        with torch.no_grad():
            return self.projection(self.new.encode_image(images))


@pytest.fixture(scope="module")
def models(tiny_refs, tmp_path_factory):
    """Old (open_clip, 32-d) and new (transformers, 48-d) tiny models and a least-squares projection new→old."""
    new_ref = build_hf_clip(tmp_path_factory.mktemp("new48"), TinyClipConfig(embed_dim=48, seed=3))
    old, new = load_backbone(tiny_refs["open_clip"]), load_backbone(new_ref)
    train = [f"a {c} {s} number {i}" for c in COLOURS for s in SHAPES for i in range(12)]
    solution = torch.linalg.lstsq(new.encode_text(train), old.encode_text(train)).solution  # (48, 32)
    projection = Projection.from_linear_map(solution.T, source_space=new.fingerprint,
                                            target_space=old.fingerprint).eval()
    return {"old_ref": tiny_refs["open_clip"], "new_ref": new_ref, "old": old, "new": new, "projection": projection}


@pytest.fixture(scope="module")
def eval_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("evalset") / "set", 30)


def _images(eval_set):
    return eval_set.load_images(range(len(eval_set.ids)))


def _spaces(models, xbt=None, baseline=None):
    """The spaces xbt eval builds, from the library's constructors."""
    old, new = encoder_space("old", OLD_MODEL, models["old"]), encoder_space("new", NEW_MODEL, models["new"])
    spaces = [old, new]
    if xbt is not None:
        adapter = encoder_space("xbt", ADAPTER, xbt)
        spaces += [adapter, blended_space("xbt+old", adapter, old, 0.5)]
    if baseline is not None:
        spaces.append(projected_space("lstsq", baseline, new, old.space_id))
    return spaces + [denoised_space("old-denoised", old)]


def _cells(report):
    return {(c["direction"], c["name"]): c for c in report["cells"]}



def test_eval_set_through_the_pair_loader_and_bad_sets(tmp_path, eval_folder):
    loaded = load_eval_set(eval_folder)
    assert loaded.ids.tolist() == [f"{n:05d}.png" for n in range(30)]  # file names, as training reads them
    assert len(loaded.texts) == sum(1 + n % 3 for n in range(30)) == len(loaded.caption_ids)
    csv_folder = tmp_path / "csv"
    csv_folder.mkdir()
    rows = ["file_name,caption"]
    for position, captions in enumerate(loaded.captions):
        name = f"{position:05d}.png"
        (csv_folder / name).write_bytes((eval_folder / name).read_bytes())
        rows += [f"{name},{caption}" for caption in captions]
    (csv_folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    from_csv = load_eval_set(csv_folder)
    assert from_csv.captions == loaded.captions and from_csv.fingerprint == loaded.fingerprint
    ided = load_eval_set(write_image_folder(tmp_path / "ided", 5, first_id=40), id_column="id")
    assert ided.ids.tolist() == ["40", "47", "54", "61", "68"]

    def broken(lines, name):
        folder = tmp_path / name
        folder.mkdir()
        Image.new("RGB", (8, 8)).save(folder / "a.png")
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
        return folder

    for lines, message in (([{"file_name": "b.png", "captions": ["x"]}], "do not exist"),
                           ([{"file_name": "a.png", "captions": [" "]}], "no image with a non-empty caption")):
        with pytest.raises(InputError, match=message):
            load_eval_set(broken(lines, message.replace(" ", "_")))
    uuid = "5f0c8a7e-1b2d-4e3f-9a8b-7c6d5e4f3a2b"
    assert load_eval_set(broken([{"file_name": "a.png", "caption": "x", "id": uuid}], "uuid"),
                         id_column="id").ids.tolist() == [uuid]
    with pytest.raises(InputError, match="metadata.jsonl"):
        load_eval_set(tmp_path)


# (query kind, query space, gallery kind, gallery space) -> role, or None: no cell. Names never matter.
# Gallery kind None: the query space searching its own gallery.
PLAN_TABLE = [
    (OLD_MODEL, "v1", None, "v1", "lower bound"),
    (NEW_MODEL, "n", None, "n", "upper bound"),
    (ADAPTER, "v1", None, "v1", "reindexed"),
    (BASELINE, "v1", None, "v1", "reindexed"),
    (BLENDED, "v1", None, "v1", None),  # query-only kinds have no gallery
    (OLD_MODEL, "v1", OLD_MODEL, "v1", None),  # two different old models: no cell between them
    (ADAPTER, "v1", OLD_MODEL, "v1", "compatibility"),
    (ADAPTER, "v9", OLD_MODEL, "v1", None),  # an adapter into another space: no cell against v1's gallery
    (BASELINE, "v1", OLD_MODEL, "v1", "baseline"),
    (BLENDED, "v1", OLD_MODEL, "v1", "blended"),
    (DENOISED, "v1", OLD_MODEL, "v1", "reference"),
    (OLD_MODEL, "v1", ADAPTER, "v1", "reindexed"),
    (NEW_MODEL, "n", OLD_MODEL, "v1", None),
    (BASELINE, "v1", ADAPTER, "v1", None),
]


@pytest.mark.parametrize("query_kind,query_space,gallery_kind,gallery_space,role", PLAN_TABLE)
def test_cells_and_roles_follow_from_space_ids_and_kinds(query_kind, query_space, gallery_kind, gallery_space, role):
    for names in (("q", "g"), ("old", "xbt"), ("xbt", "old")):  # any names, even misleading ones
        query = Space(names[0], query_kind, query_space, 8)
        if gallery_kind is None:
            gallery, names = query, (names[0], names[0])
        else:
            gallery = Space(names[1], gallery_kind, gallery_space, 8)
        plan = plan_cells(list({s.name: s for s in (gallery, query)}.values()),
                          {"text→image": ({query.name}, {gallery.name})})
        assert [(c.query, c.gallery, c.role) for c in plan] == ([] if role is None else [(*names, role)])


def test_a_chained_adapter_is_compatible_with_the_space_it_writes_into():
    """v3 trained against a v2 adapter writes v1's space: v3→v1 and v2→v1 are compatibility cells, nothing special."""
    v1, v3_native = Space("v1", OLD_MODEL, "space-v1", 8), Space("v3-native", NEW_MODEL, "space-v3", 16)
    v2, v3 = Space("v2", ADAPTER, "space-v1", 8), Space("v3", ADAPTER, "space-v1", 8)
    every = {"v1", "v2", "v3", "v3-native"}
    plan = plan_cells([v1, v3_native, v2, v3], {"text→image": (every, every)})
    assert [(c.name, c.role) for c in plan] == [
        ("v1→v1", "lower bound"), ("v3-native→v3-native", "upper bound"), ("v2→v1", "compatibility"),
        ("v3→v1", "compatibility"), ("v2→v2", "reindexed"), ("v1→v2", "reindexed"), ("v3→v3", "reindexed"),
        ("v1→v3", "reindexed")]
    assert {(c.query_space_id, c.gallery_space_id) for c in plan if c.role == "compatibility"} == {("space-v1",) * 2}
    with pytest.raises(InputError, match="both claim space space-v1"):
        plan_cells([v1, Space("v4", ADAPTER, "space-v1", 4)], {"text→image": ({"v4"}, {"v1"})})


def test_matrix_agrees_with_direct_computation_and_goes_through_the_embedding_cache(models, eval_folder, tmp_path):
    eval_set = load_eval_set(eval_folder)
    xbt = ProjectedModel(models["new"], models["old"], models["projection"])
    config = EvalConfig(ks=KS, fractions=(0.0, 0.5, 1.0))
    report = evaluate(eval_set, _spaces(models, xbt, models["projection"]), config=config,
                      cache_dir=tmp_path / "cache")
    cells = _cells(report)
    roles = {"old→old": "lower bound", "new→new": "upper bound", "xbt→old": "compatibility",
             "xbt+old→old": "blended", "lstsq→old": "baseline", "old-denoised→old": "reference",
             "xbt→xbt": "reindexed", "lstsq→lstsq": "reindexed", "old→xbt": "reindexed", "xbt+old→xbt": "reindexed"}
    text_only = {"xbt+old→old", "old-denoised→old", "xbt+old→xbt"}
    assert {key: c["role"] for key, c in cells.items()} == {
        **{("text→image", name): role for name, role in roles.items()},
        **{("image→text", name): role for name, role in roles.items() if name not in text_only}}
    old_space = models["old"].space_id
    assert cells[("text→image", "xbt→old")]["query_space_id"] == cells[("text→image", "xbt→old")]["gallery_space_id"] \
        == old_space and cells[("image→text", "new→new")]["gallery_space_id"] == models["new"].space_id

    # Independent recomputation of a few cells straight from the encoders.
    owners = eval_set.caption_ids
    old_images = Labeled(models["old"].encode_image(_images(eval_set)).numpy(), eval_set.ids)
    xbt_texts = Labeled(xbt.encode_text(eval_set.texts).numpy(), owners)
    old_texts = Labeled(models["old"].encode_text(eval_set.texts).numpy(), owners)
    new_images = Labeled(models["new"].encode_image(_images(eval_set)).numpy(), eval_set.ids)
    blended = torch.nn.functional.normalize(0.5 * torch.from_numpy(xbt_texts.vectors)
                                            + 0.5 * torch.from_numpy(old_texts.vectors), dim=-1)
    expected = {("text→image", "xbt→old"): recall_at_k(xbt_texts, old_images, KS),
                ("text→image", "xbt+old→old"): recall_at_k(Labeled(blended.numpy(), owners), old_images, KS),
                ("image→text", "old→old"): recall_at_k(old_images, old_texts, KS),
                ("image→text", "new→new"): recall_at_k(new_images, Labeled(models["new"].encode_text(eval_set.texts).numpy(), owners), KS)}
    for key, recall in expected.items():
        assert cells[key]["recall"] == {str(k): v for k, v in recall.items()}
    lower, upper = cells[("text→image", "old→old")]["recall"], cells[("text→image", "new→new")]["recall"]
    for name in ("xbt→old", "lstsq→old", "xbt+old→old", "old-denoised→old"):
        cell = cells[("text→image", name)]
        for k in ("1", "5", "10"):
            assert cell["compatible"][k] == (cell["recall"][k] > lower[k])
            span = upper[k] - lower[k]
            assert cell["gap_recovered"][k] == (None if not span else pytest.approx((cell["recall"][k] - lower[k]) / span))
    assert cells[("text→image", "xbt→xbt")]["compatible"] is None  # reindexed cells are not scored
    # Every ordering's backfill curve runs from xbt→old (nothing re-embedded) to xbt→xbt (everything, one index)
    # and, re-embedded by the new model (two indexes, rank merge), to new→new.
    for key, target in (("backfill", "xbt→xbt"), ("backfill_new_model", "new→new")):
        assert set(report[key]) == {"text→image", "image→text"}, key  # the baseline's own re-indexed cell too
        for direction, curve in report[key].items():
            assert (curve["query"], curve["gallery"]) == ("xbt", "old")
            assert set(curve["orderings"]) == {"random", "hubness", "density", "oracle"}
            for values in curve["orderings"].values():
                assert values["merge"] == ("score" if key == "backfill" else "rank")
                assert [values["recall"][k][0] for k in KS] == [cells[(direction, "xbt→old")]["recall"][str(k)]
                                                                 for k in KS]
                assert [values["recall"][k][-1] for k in KS] == [cells[(direction, target)]["recall"][str(k)]
                                                                  for k in KS]
    assert report["dataset"]["images"] == 30
    assert report["spaces"]["old"]["model_id"] == models["old"].model_id
    assert report["spaces"]["lstsq"]["kind"] == "baseline" and report["spaces"]["xbt+old"]["blend_alpha"] == 0.5

    # The package's embedding cache holds the vectors: one cache per encoder and modality, recording its space.
    caches = [EmbeddingCache(path.parent) for path in (tmp_path / "cache").glob("*/manifest.json")]
    assert sorted((c.fingerprints["text" if "text" in c.names else "image"], *c.space_ids.values()) for c in caches) \
        == sorted((f"{encoder.model_id}:{modality}", encoder.space_id) for encoder in (models["old"], models["new"], xbt)
                  for modality in ("text", "image"))
    old_text_cache = next(c for c in caches if c.fingerprints.get("text") == f"{models['old'].model_id}:text")
    assert np.array_equal(old_text_cache["text"].numpy(), old_texts.vectors)

    # Second run: every space comes from the cache (the stand-in model is not called), same numbers.
    calls = xbt.calls
    again = evaluate(eval_set, _spaces(models, xbt, models["projection"]), config=config, cache_dir=tmp_path / "cache")
    assert xbt.calls == calls and again["cells"] == report["cells"]
    # Another set under the same cache: re-encoded, not confused with the first.
    other = load_eval_set(write_image_folder(tmp_path / "other", 12, seed=5))
    evaluate(other, _spaces(models, xbt), config=config, cache_dir=tmp_path / "cache")
    assert xbt.calls > calls


def test_an_xbt_model_is_evaluated_against_the_space_it_writes_into(models, tiny_encoders, eval_folder):
    """The chained-configuration criterion: the XBTModel states its space; xbt→old exists because the ids match."""
    import copy

    from xbt.model import XBTModel

    model = XBTModel(load_backbone(models["new_ref"]), copy.deepcopy(models["projection"]),
                     old_reference=models["old_ref"])
    assert model.space_id == models["old"].space_id != model.source_space_id
    eval_set = load_eval_set(eval_folder)
    old = encoder_space("old", OLD_MODEL, models["old"])
    spaces = [old, native_space("new", model), adapter_space("xbt", model)]
    config = EvalConfig(ks=KS, fractions=(0.0, 1.0))
    cells = _cells(evaluate(eval_set, spaces, config=config))
    for direction in ("text→image", "image→text"):
        cell = cells[(direction, "xbt→old")]
        assert cell["role"] == "compatibility" and cell["query_space_id"] == model.space_id == cell["gallery_space_id"]
        assert cells[(direction, "new→new")]["query_space_id"] == model.source_space_id
    queries = Labeled(model.encode_text(eval_set.texts).numpy(), eval_set.caption_ids)
    gallery = Labeled(models["old"].encode_image(_images(eval_set)).numpy(), eval_set.ids)
    assert cells[("text→image", "xbt→old")]["recall"] == {str(k): v for k, v in recall_at_k(queries, gallery, KS).items()}

    # An encoder of another space (a second tiny model, same dimension as the old one) gets no cell against old.
    stranger = tiny_encoders["hf"]
    assert stranger.dim == models["old"].dim and stranger.space_id != models["old"].space_id
    crossed = _cells(evaluate(eval_set, [old, encoder_space("other", ADAPTER, stranger)], config=config))
    assert {name for _, name in crossed} == {"old→old", "other→other"}
    assert not any(c["gallery"] == "old" and c["query"] != "old" for c in crossed.values())

    # A stored gallery recorded in another space is refused, naming both ids.
    recorded = Labeled(gallery.vectors, gallery.labels, space_id=stranger.space_id)
    with pytest.raises(FingerprintMismatchError) as refused:
        evaluate(eval_set, [old], stored_galleries={"old": recorded}, config=config)
    assert stranger.space_id in str(refused.value) and models["old"].space_id in str(refused.value)


def test_stored_gallery_with_distractors_and_ids(models, tmp_path):
    folder = write_image_folder(tmp_path / "ided", 20, seed=1, first_id=1000)
    eval_set = load_eval_set(folder, id_column="id")
    old_images = models["old"].encode_image(_images(eval_set)).numpy()
    config = EvalConfig(ks=KS, fractions=(0.0, 1.0))
    plain = evaluate(eval_set, _spaces(models), config=config)

    # The same vectors stored in a shuffled faiss IDMap: identical numbers.
    order = np.random.default_rng(0).permutation(20)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(32))
    index.add_with_ids(old_images[order], eval_set.ids[order].astype(np.int64))
    faiss.write_index(index, str(tmp_path / "gallery.faiss"))
    from xbt.retrieval import load_embeddings

    stored = {"old": load_embeddings(tmp_path / "gallery.faiss")}
    same = evaluate(eval_set, _spaces(models), stored_galleries=stored, config=config)
    pick = lambda report: [c for c in report["cells"] if c["direction"] == "text→image"]  # noqa: E731
    assert pick(same) == pick(plain)

    # Distractors that outrank true images: the old text vectors of the first images' captions, stored in the
    # gallery under ids no query has. Each such caption now finds its own copy first.
    old_texts = models["old"].encode_text(eval_set.texts).numpy()
    owners = eval_set.caption_ids
    copied = np.flatnonzero(np.isin(owners, eval_set.ids[:6]))
    distractors = np.concatenate([old_texts[copied], np.random.default_rng(1).normal(size=(300, 32)).astype(np.float32)])
    distractor_ids = np.array([f"distractor-{i}" for i in range(len(distractors))])
    big = Labeled(np.concatenate([old_images, distractors]), np.concatenate([eval_set.ids, distractor_ids]))
    crowded = _cells(evaluate(eval_set, _spaces(models), stored_galleries={"old": big}, config=config))
    expected = recall_at_k(Labeled(old_texts, owners), big, KS)
    assert crowded[("text→image", "old→old")]["recall"] == {str(k): v for k, v in expected.items()}
    without = recall_at_k(Labeled(old_texts, owners), Labeled(old_images, eval_set.ids), KS)
    # every copied caption misses at R@1 (its copy scores 1, above any image), so at least those hits are lost
    lost = int(np.sum(recall_hits(Labeled(old_texts, owners), Labeled(old_images, eval_set.ids))[copied]))
    assert lost > 0 and crowded[("text→image", "old→old")]["recall"]["1"] <= without[1] - 100.0 * lost / len(owners)
    # the image→text direction searches captions, not the stored image gallery: the distractors change nothing there
    assert crowded[("image→text", "old→old")]["recall"] == _cells(plain)[("image→text", "old→old")]["recall"]
    assert evaluate(eval_set, _spaces(models), stored_galleries={"old": big}, config=config)["dataset"]["stored"][
        "old (gallery)"]["items"] == 20 + len(distractors)

    # Ids that do not line up, or another dimension: refused before anything is encoded.
    class Refuse:
        dim, space_id, model_id = 32, models["old"].space_id, "refuse"

        def encode_text(self, texts):
            raise AssertionError("encoded before the input was checked")

        encode_image = encode_text

    spaces = [encoder_space("old", OLD_MODEL, Refuse()), encoder_space("new", NEW_MODEL, Refuse())]
    with pytest.raises(InputError, match="line up"):
        evaluate(eval_set, spaces, stored_galleries={"old": Labeled(old_images, np.arange(20))}, config=config)
    with pytest.raises(InputError, match="dimension 16"):
        evaluate(eval_set, spaces, stored_galleries={"old": Labeled(old_images[:, :16], eval_set.ids)}, config=config)
    bad = old_images.copy()
    bad[3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        evaluate(eval_set, spaces, stored_galleries={"old": Labeled(bad, eval_set.ids)}, config=config)
    with pytest.raises(InputError, match="names no space"):
        evaluate(eval_set, spaces, stored_galleries={"v7": Labeled(old_images, eval_set.ids)}, config=config)


def recall_hits(queries: Labeled, gallery: Labeled) -> np.ndarray:
    """Per query: whether its best-scoring gallery item (lowest row among ties) is relevant (R@1 hit)."""
    scores = queries.vectors.astype(np.float64) @ gallery.vectors.astype(np.float64).T
    return gallery.labels[np.argmax(scores, axis=1)] == queries.labels


@pytest.mark.slow
def test_cli_writes_every_output_for_models_and_a_projection_baseline(models, eval_folder, tmp_path, capsys):
    models["projection"].save_pretrained(tmp_path / "lstsq")
    output = tmp_path / "eval"
    assert cli(["eval", "--old_model", models["old_ref"], "--new_model", models["new_ref"],
                "--baselines", f"lstsq={tmp_path / 'lstsq'}", "--eval_set", str(eval_folder),
                "--output_dir", str(output), "--shard_rows", "7"]) == 0
    report = json.loads((output / "metrics.json").read_text())
    roles = {c["name"]: c["role"] for c in report["cells"]}
    assert {"old→old": "lower bound", "new→new": "upper bound", "lstsq→old": "baseline", "lstsq→lstsq": "reindexed",
            "old-denoised→old": "reference"}.items() <= roles.items()
    assert report["spaces"]["new"]["reference"] == models["new_ref"] and report["spaces"]["lstsq"]["kind"] == "baseline"
    lstsq = next(c for c in report["cells"] if c["name"] == "lstsq→old" and c["direction"] == "text→image")
    assert set(lstsq["gap_recovered"]) == {"1", "5", "10"}
    for plot in ("matrix.png", "recall_bars.png"):
        with Image.open(output / plot) as image:
            image.verify()
    assert "lstsq→old" in (output / "report.md").read_text() and "lstsq→old" in capsys.readouterr().out
    caches = [EmbeddingCache(path.parent) for path in (output / "cache").glob("*/manifest.json")]
    assert len(caches) == 4  # old/new × text/image; baselines are derived, not cached
    assert {space for c in caches for space in c.space_ids.values()} == {models["old"].space_id, models["new"].space_id}

    # A projection made for other models is refused, naming its space.
    stranger = Projection.from_linear_map(torch.zeros(32, 48), source_space="hf-0000", target_space=None)
    stranger.save_pretrained(tmp_path / "stranger")
    assert cli(["eval", "--old_model", models["old_ref"], "--new_model", models["new_ref"],
                "--baselines", f"s={tmp_path / 'stranger'}", "--eval_set", str(eval_folder),
                "--output_dir", str(tmp_path / "x")]) == 2
    assert "hf-0000" in capsys.readouterr().err


def test_cli_refuses_a_folder_that_is_no_adapter(models, eval_folder, tmp_path, capsys):
    (tmp_path / "adapter").mkdir()
    assert cli(["eval", "--old_model", models["old_ref"], "--new_model", models["new_ref"],
                "--adapter", str(tmp_path / "adapter"), "--eval_set", str(eval_folder),
                "--output_dir", str(tmp_path / "out")]) == 2
    assert "is not an xbt adapter directory" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--eval_set", "x"], "--eval_set 'x' needs both --old_model and --new_model"),
    (["--galleries", "old=a.npy"], "Give --eval_set"),
    (["--galleries", "old", "--queries", "old=b.npy"], "--galleries expects NAME=PATH"),
    (["--galleries", "old=a.npy", "--queries", "old=b.npy", "--ks", "0"], "--ks must be positive"),
    (["--galleries", "old=a.npy", "--queries", "old=b.npy", "--gallery_modality", "audio"], "--gallery_modality"),
    (["--eval_set", "x", "--old_model", "a", "--new_model", "b", "--baselines", "xbt=dir"], "--baselines name 'xbt'"),
    (["--eval_set", "x", "--old_model", "a", "--new_model", "b", "--blend_alpha", "2"], "--blend_alpha"),
    (["--eval_set", "x", "--old_model", "a", "--new_model", "b", "--baselines", "pca"], "Unknown baseline 'pca'"),
    (["--eval_set", "x", "--old_model", "a", "--new_model", "b", "--baselines", "slerp", "--support_fraction", "1"],
     "--support_fraction must lie strictly between 0 and 1"),
    (["--eval_set", "x", "--old_model", "a", "--new_model", "b", "--baselines", "mlp", "--fit_on", "audio"],
     "fitted on text and/or image pairs, got ['audio']"),
    (["--eval_set", "x", "--old_model", "a", "--new_model", "b", "--baselines", "low_rank", "--rank", "0"],
     "--rank must be at least 1"),
    (["--galleries", "old=a.npy", "--galleries", "xbt=b.npy", "--queries", "old=c.npy"], "--galleries is given 2 times"),
])
def test_cli_refuses_bad_options_in_one_line(argv, message, tmp_path, capsys):
    assert cli(["eval", "--output_dir", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("xbt eval: error:") and "Traceback" not in err


def test_cli_on_stored_embeddings_only(tmp_path, capsys):
    rng = np.random.default_rng(2)
    old_gallery = rng.normal(size=(300, 16)).astype(np.float32)
    xbt_gallery = old_gallery + 0.3 * rng.normal(size=(300, 16)).astype(np.float32)
    ids = rng.choice(10**6, 300, replace=False)
    targets = rng.integers(0, 300, 200)
    np.save(tmp_path / "old.npy", old_gallery)
    np.save(tmp_path / "xbt.npy", xbt_gallery)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "qids.npy", ids[targets])
    np.save(tmp_path / "q_old.npy", old_gallery[targets] + 1.0 * rng.normal(size=(200, 16)).astype(np.float32))
    np.save(tmp_path / "q_xbt.npy", xbt_gallery[targets] + 0.5 * rng.normal(size=(200, 16)).astype(np.float32))
    output = tmp_path / "out"
    assert cli(["eval", "--galleries", f"old={tmp_path / 'old.npy'}", f"xbt={tmp_path / 'xbt.npy'}",
                "--gallery_ids", str(tmp_path / "ids.npy"), "--queries", f"old={tmp_path / 'q_old.npy'}",
                f"xbt={tmp_path / 'q_xbt.npy'}", "--query_ids", str(tmp_path / "qids.npy"),
                "--output_dir", str(output)]) == 0
    report = json.loads((output / "metrics.json").read_text())
    assert [(c["name"], c["role"]) for c in report["cells"]] == [
        ("old→old", "lower bound"), ("xbt→old", "compatibility"), ("xbt→xbt", "reindexed"), ("old→xbt", "reindexed")]
    assert report["backfill"]["text→image"]["orderings"]["random"]["recall"]["1"][-1] == \
        report["cells"][2]["recall"]["1"]
    with Image.open(output / "backfill.png") as image:
        image.verify()
    assert "**stored old (gallery)**: 300 vectors of dimension 16" in (output / "report.md").read_text()
    # The same run from --config FILE.yaml (lists as YAML lists); a flag overrides the file.
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({
        "galleries": [f"old={tmp_path / 'old.npy'}", f"xbt={tmp_path / 'xbt.npy'}"], "gallery_ids": str(tmp_path / "ids.npy"),
        "queries": [f"old={tmp_path / 'q_old.npy'}", f"xbt={tmp_path / 'q_xbt.npy'}"], "query_ids": str(tmp_path / "qids.npy"),
        "output_dir": str(tmp_path / "from_file"), "ks": [1, 5, 10]}))
    assert cli(["eval", "--config", str(tmp_path / "eval.yaml"), "--ks", "1", "5"]) == 0
    from_file = json.loads((tmp_path / "from_file" / "metrics.json").read_text())
    assert from_file["ks"] == [1, 5] and [c["recall"]["1"] for c in from_file["cells"]] == \
        [c["recall"]["1"] for c in report["cells"]]
    np.save(tmp_path / "qids_bad.npy", ids[targets] + 1)
    assert cli(["eval", "--galleries", f"old={tmp_path / 'old.npy'}", "--gallery_ids", str(tmp_path / "ids.npy"),
                "--queries", f"old={tmp_path / 'q_old.npy'}", "--query_ids", str(tmp_path / "qids_bad.npy"),
                "--output_dir", str(output)]) == 2
    assert "line up" in capsys.readouterr().err


@pytest.mark.parametrize("style", ["file names", "uuids"])
def test_cli_with_a_stored_gallery_keyed_by_file_names_or_uuids(style, models, tmp_path):
    """The demo's gallery/ids.txt (image file names) and a production gallery keyed by UUIDs both evaluate."""
    folder = write_image_folder(tmp_path / "set", 12, seed=4)
    names = [f"{n:05d}.png" for n in range(12)]
    if style == "uuids":  # the set names its images by the gallery's keys
        keys = [f"{n:08x}-7d1e-4c2b-8a9f-{n * 977:012x}" for n in range(12)]
        lines = [dict(json.loads(line), id=key) for line, key in
                 zip((folder / "metadata.jsonl").read_text().splitlines(), keys)]
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    else:
        keys = names
    images = models["old"].encode_image([folder / name for name in names]).numpy()
    order = np.random.default_rng(3).permutation(12)  # stored in another order than the set
    extra = np.random.default_rng(4).normal(size=(5, 32)).astype(np.float32)
    np.save(tmp_path / "gallery.npy", np.concatenate([images[order], extra]))
    (tmp_path / "ids.txt").write_text("\n".join([keys[i] for i in order] + [f"other-{i}" for i in range(5)]) + "\n")
    output = tmp_path / "eval"
    assert cli(["eval", "--old_model", models["old_ref"], "--new_model", models["new_ref"], "--eval_set", str(folder),
                *(["--id_column", "id"] if style == "uuids" else []), "--galleries", f"old={tmp_path / 'gallery.npy'}",
                "--gallery_ids", str(tmp_path / "ids.txt"), "--output_dir", str(output)]) == 0
    cells = _cells(json.loads((output / "metrics.json").read_text()))
    eval_set = load_eval_set(folder, id_column="id" if style == "uuids" else None)
    texts = Labeled(models["old"].encode_text(eval_set.texts).numpy(), eval_set.caption_ids)
    gallery = Labeled(np.concatenate([images[order], extra]), [keys[i] for i in order] + [f"other-{i}" for i in range(5)])
    assert cells[("text→image", "old→old")]["recall"] == {str(k): v for k, v in recall_at_k(texts, gallery, KS).items()}


def _eval_acting_adapter(model, models, eval_folder, folder, output, *flags: str) -> dict:
    """Give ``model``'s LoRA an effect of its own (B starts at zero), save it to ``folder``, run ``xbt eval`` on it
    into ``output``; returns metrics.json."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.lora_parameters():
            parameter.normal_(std=0.05)
    model.save_pretrained(folder)
    return _eval_adapter(models, eval_folder, folder, output, *flags)


def _eval_adapter(models, eval_folder, folder, output, *flags: str) -> dict:
    """``xbt eval`` of the saved adapter in ``folder`` on ``eval_folder`` into ``output``; returns metrics.json."""
    assert cli(["eval", "--old_model", models["old_ref"], "--new_model", models["new_ref"], "--adapter", str(folder),
                "--eval_set", str(eval_folder), "--output_dir", str(output), *flags]) == 0
    return json.loads((output / "metrics.json").read_text())


@pytest.mark.slow
def test_cli_on_a_tiny_real_adapter(models, eval_folder, tmp_path):
    import copy

    from xbt.model import XBTModel

    model = XBTModel(load_backbone(models["new_ref"]), copy.deepcopy(models["projection"]), old_reference=models["old_ref"])
    output = tmp_path / "eval"
    report = _eval_acting_adapter(model, models, eval_folder, tmp_path / "adapter", output, "--blend_alpha", "0.3")
    cells = _cells(report)
    assert {("text→image", n): r for n, r in (("xbt→old", "compatibility"), ("xbt+old→old", "blended"),
                                              ("xbt→xbt", "reindexed"), ("old→xbt", "reindexed"),
                                              ("xbt+old→xbt", "reindexed"))}.items() \
        <= {key: c["role"] for key, c in cells.items()}.items()
    assert set(report["backfill"]) == {"text→image", "image→text"}
    for plot in ("matrix.png", "recall_bars.png", "backfill.png"):
        with Image.open(output / plot) as image:
            image.verify()
    # The adapter cells agree with the reloaded adapter encoding the set directly.
    eval_set = load_eval_set(eval_folder)
    reloaded = XBTModel.from_pretrained(tmp_path / "adapter")
    reloaded.use_old_encoder(models["old"])
    old_images = Labeled(models["old"].encode_image(_images(eval_set)).numpy(), eval_set.ids)
    for name, alpha in (("xbt→old", 0.0), ("xbt+old→old", 0.3)):
        queries = Labeled(reloaded.encode_text(eval_set.texts, blend_old=alpha).numpy(), eval_set.caption_ids)
        assert cells[("text→image", name)]["recall"] == {str(k): v for k, v in recall_at_k(queries, old_images, KS).items()}
    assert report["spaces"]["xbt+old"]["blend_alpha"] == 0.3
    assert report["spaces"]["xbt"]["space_id"] == models["old"].space_id


@pytest.mark.slow
def test_cli_fits_peer_baselines_on_a_support_split_left_out_of_every_cell(models, eval_folder, tmp_path):
    output = tmp_path / "eval"
    assert cli(["eval", "--old_model", models["old_ref"], "--new_model", models["new_ref"], "--eval_set",
                str(eval_folder), "--baselines", "slerp", "procrustes", "low_rank+diag", "mlp", "--rank", "8",
                "--support_fraction", "0.3", "--seed", "4", "--output_dir", str(output)]) == 0
    report = json.loads((output / "metrics.json").read_text())
    cells = _cells(report)
    for direction in ("text→image", "image→text"):
        assert {name: cells[(direction, f"{name}→old")]["role"] for name in ("slerp", "procrustes", "low_rank+diag",
                                                                             "mlp")} == dict.fromkeys(
            ("slerp", "procrustes", "low_rank+diag", "mlp"), "baseline")
        assert cells[(direction, "procrustes→procrustes")]["role"] == "reindexed"
        assert (direction, "slerp→slerp") not in cells  # queries only: it searches the old gallery
    spaces = report["spaces"]
    assert spaces["slerp"]["kind"] == "blended baseline" and spaces["slerp"]["runs_old_encoder_on_queries"]
    assert spaces["low_rank+diag"] == {**spaces["low_rank+diag"], "kind": "baseline", "rank": 8, "fit_on": ["text"]}

    # The support split: 9 of the 30 images, drawn by the seed, in no measured cell.
    eval_set = load_eval_set(eval_folder)
    support = support_ids(eval_set.ids, 0.3, seed=4)
    assert report["dataset"]["support"] == {"fraction": 0.3, "seed": 4, "images": 9, "measured_images": 21,
                                            "captions": int(np.isin(eval_set.caption_ids, support).sum())}
    encoded = {(name, modality): Labeled((encoder.encode_text(eval_set.texts) if modality == "text" else
                                          encoder.encode_image(_images(eval_set))).numpy(),
                                         eval_set.caption_ids if modality == "text" else eval_set.ids)
               for name, encoder in (("old", models["old"]), ("new", models["new"])) for modality in ("text", "image")}

    def split(labeled, part):
        keep = np.isin(labeled.labels, support) == (part == "support")
        return Labeled(labeled.vectors[keep], labeled.labels[keep])

    support_pairs = [split(encoded[(name, "text")], "support").vectors for name in ("new", "old")]
    for name in ("procrustes", "low_rank+diag", "mlp", "slerp"):
        assert spaces[name]["fit_seconds"] > 0 and spaces[name]["fit_pairs"] == len(support_pairs[0])
    # Brute force on the 21 measured images: the bound, the Procrustes baseline and SLERP with the reported α.
    procrustes = fit_procrustes(*support_pairs)
    for direction, (query, gallery) in {"text→image": ("text", "image"), "image→text": ("image", "text")}.items():
        old_queries, old_gallery = split(encoded[("old", query)], "measured"), split(encoded[("old", gallery)], "measured")
        aligned = apply_projection(procrustes, split(encoded[("new", query)], "measured"), None)
        alpha = spaces["slerp"]["alpha"][direction]
        mixed = Labeled(slerp(old_queries.vectors, aligned.vectors, alpha), old_queries.labels)
        for cell, queries in (("old→old", old_queries), ("procrustes→old", aligned), ("slerp→old", mixed)):
            expected = recall_hits(queries, old_gallery).mean() * 100
            assert cells[(direction, cell)]["recall"]["1"] == pytest.approx(expected, abs=1e-9), (direction, cell)
        # α maximises the support recall of its curve; the curve's α = 0 end is the old model's own support cell
        curve = spaces["slerp"]["alpha_curve"][direction]
        assert curve["alphas"] == list(ALPHAS) and len(curve["recall"]["10"]) == len(ALPHAS)
        assert alpha == best_alpha(ALPHAS, {int(k): v for k, v in curve["recall"].items()})
        support_old = split(encoded[("old", query)], "support")
        assert curve["recall"]["1"][0] == pytest.approx(
            recall_hits(support_old, split(encoded[("old", gallery)], "support")).mean() * 100)
    report_md = (output / "report.md").read_text()
    assert f"| `slerp` | blended baseline | text | {len(support_pairs[0])} |" in report_md and "### `slerp` α curve, image→text" in report_md
    with Image.open(output / "alpha_curve.png") as image:
        image.verify()


@pytest.mark.slow
def test_cli_fits_the_maps_on_a_stage1_cache_and_refuses_another_models_cache(models, eval_folder, tmp_path, capsys):
    captions = [f"a {c} {s} number {i}" for c in COLOURS for s in SHAPES for i in range(12)]
    cache = build_cache(tmp_path / "stage1", [text_source("old", models["old"]), text_source("new", models["new"])],
                        captions, progress=False)
    output = tmp_path / "eval"
    assert cli(["eval", "--old_model", models["old_ref"], "--new_model", models["new_ref"], "--eval_set",
                str(eval_folder), "--baselines", "ridge+diag", "--support_cache", str(cache.path),
                "--output_dir", str(output)]) == 0
    report = json.loads((output / "metrics.json").read_text())
    fitted = report["spaces"]["ridge+diag"]
    assert fitted["fit_pairs"] == len(captions) and fitted["fit_seconds"] > 0
    assert fitted["fit_on"] == [f"stage-1 cache {cache.path}"]
    assert "support" not in report["dataset"]  # nothing fitted on the split: every image is measured
    # brute force: the same map fitted on the cached pairs, every evaluation image measured
    eval_set = load_eval_set(eval_folder)
    projection = fit_baseline("ridge+diag", cache["new"], cache["old"])
    queries = apply_projection(projection, Labeled(models["new"].encode_text(eval_set.texts).numpy(),
                                                   eval_set.caption_ids), None)
    gallery = Labeled(models["old"].encode_image(_images(eval_set)).numpy(), eval_set.ids)
    assert _cells(report)[("text→image", "ridge+diag→old")]["recall"]["1"] == pytest.approx(
        recall_hits(queries, gallery).mean() * 100, abs=1e-9)

    swapped = build_cache(tmp_path / "swapped", [text_source("old", models["new"]), text_source("new", models["old"])],
                          captions, progress=False)
    assert cli(["eval", "--old_model", models["old_ref"], "--new_model", models["new_ref"], "--eval_set",
                str(eval_folder), "--baselines", "ridge", "--support_cache", str(swapped.path),
                "--output_dir", str(tmp_path / "x")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the models' loading progress
    assert last.startswith("xbt eval: error: The 'new' embeddings of --support_cache") and "Traceback" not in last
    assert cli(["eval", "--old_model", models["old_ref"], "--new_model", models["new_ref"], "--eval_set",
                str(eval_folder), "--baselines", "ridge", "--support_cache", str(tmp_path),
                "--output_dir", str(tmp_path / "y")]) == 2
    assert "is no embedding cache folder" in capsys.readouterr().err


def test_fitted_baselines_pair_items_by_id_with_a_stored_shuffled_old_gallery_with_distractors(models, eval_folder):
    eval_set = load_eval_set(eval_folder)
    old_images = models["old"].encode_image(_images(eval_set)).numpy()

    def spaces():
        old, new = encoder_space("old", OLD_MODEL, models["old"]), encoder_space("new", NEW_MODEL, models["new"])
        return [old, new, slerp_space("slerp", new, old), fitted_space("ridge", "ridge", new, old, ("text", "image"))]

    config = EvalConfig(ks=KS, fractions=(0.0, 1.0), support_fraction=0.3, seed=2)
    plain = evaluate(eval_set, spaces(), config=config)
    order = np.random.default_rng(0).permutation(len(old_images))
    shuffled = Labeled(old_images[order], eval_set.ids[order], models["old"].space_id)
    same = evaluate(eval_set, spaces(), stored_galleries={"old": shuffled}, config=config)
    assert same["cells"] == plain["cells"]
    assert {name: {k: v for k, v in same["spaces"][name].items() if k != "fit_seconds"} for name in ("slerp", "ridge")} \
        == {name: {k: v for k, v in plain["spaces"][name].items() if k != "fit_seconds"} for name in ("slerp", "ridge")}
    support = support_ids(eval_set.ids, 0.3, seed=2)  # ridge learns from the support captions and images
    assert plain["spaces"]["ridge"]["fit_pairs"] == np.isin(eval_set.caption_ids, support).sum() + len(support)
    # Distractors join the gallery only: the fits and SLERP's image queries are unchanged, the cells see them.
    distractors = np.random.default_rng(1).normal(size=(50, 32)).astype(np.float32)
    crowded = Labeled(np.concatenate([old_images[order], distractors]),
                      np.concatenate([eval_set.ids[order], [f"distractor-{i}" for i in range(50)]]),
                      models["old"].space_id)
    report = evaluate(eval_set, spaces(), stored_galleries={"old": crowded}, config=config)
    assert report["spaces"]["slerp"]["alpha"] == plain["spaces"]["slerp"]["alpha"]
    assert report["spaces"]["ridge"]["fit_pairs"] == plain["spaces"]["ridge"]["fit_pairs"]


def _brute_force_recall(queries: np.ndarray, query_ids: np.ndarray, gallery: np.ndarray, gallery_ids: np.ndarray,
                        ks=KS) -> dict[str, float]:
    """Recall@K in percent by exhaustive inner products: a hit if any of the top K gallery rows has the query's id."""
    order = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")
    hits = gallery_ids[order] == query_ids[:, None]
    return {str(k): 100.0 * float(hits[:, :k].any(axis=1).mean()) for k in ks}


def test_cli_evaluates_the_full_space_of_an_adapter_with_extra_dims(models, eval_folder, tmp_path):
    from xbt.adapter_config import ProjectionConfig
    from xbt.model import XBTModel

    new, old = models["new"], models["old"]
    torch.manual_seed(0)
    psi = Projection.build(new.dim, old.dim, ProjectionConfig(kind="orthogonal", extra_dims=6),
                           source_space=new.space_id, target_space=old.space_id)
    model = XBTModel(load_backbone(models["new_ref"]), psi, old_reference=models["old_ref"])
    report = _eval_acting_adapter(model, models, eval_folder, tmp_path / "adapter", tmp_path / "eval")
    cells = _cells(report)
    full_id = model.full_space_id
    assert report["spaces"]["xbt-full"]["space_id"] == full_id and report["spaces"]["xbt-full"]["dim"] == 32 + 6
    # Only its own cell: no other space writes into it, and it writes into no other one.
    assert sorted(key for key, c in cells.items() if "xbt-full" in (c["query"], c["gallery"])) == [
        ("image→text", "xbt-full→xbt-full"), ("text→image", "xbt-full→xbt-full")]
    assert cells[("text→image", "xbt→old")]["role"] == "compatibility"  # beside the compatible cell, as before

    eval_set = load_eval_set(eval_folder)
    reloaded = XBTModel.from_pretrained(tmp_path / "adapter")
    texts = reloaded.encode_text(eval_set.texts, space="full").numpy()
    images = reloaded.encode_image(_images(eval_set), space="full").numpy()
    assert texts.shape[1] == images.shape[1] == 38
    expected = {"text→image": _brute_force_recall(texts, eval_set.caption_ids, images, eval_set.ids),
                "image→text": _brute_force_recall(images, eval_set.ids, texts, eval_set.caption_ids)}
    for direction, recall in expected.items():
        cell = cells[(direction, "xbt-full→xbt-full")]
        assert cell["role"] == "reindexed" and cell["query_space_id"] == cell["gallery_space_id"] == full_id
        assert cell["recall"] == pytest.approx(recall)

    # A full-space gallery as `xbt embed --space full` stores it is searched as that space's gallery.
    from xbt.embed import run as embed

    assert embed(["--model", f"xbt:{tmp_path / 'adapter'}", "--source", str(eval_folder), "--modality", "image",
                  "--space", "full", "--merge", "false", "--output_dir", str(tmp_path / "full_gallery"),
                  "--num_workers", "0", "--progress", "false"]) == 0
    stored = _eval_adapter(models, eval_folder, tmp_path / "adapter", tmp_path / "eval_stored",
                           "--galleries", f"xbt-full={tmp_path / 'full_gallery'}")
    assert stored["dataset"]["stored"]["xbt-full (gallery)"]["space_id"] == full_id
    cell = _cells(stored)[("text→image", "xbt-full→xbt-full")]
    assert cell["gallery_space_id"] == full_id and cell["recall"] == pytest.approx(expected["text→image"])
