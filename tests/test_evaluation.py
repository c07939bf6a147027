"""End to end on a generated image folder with real PNGs and tiny real models: spaces, cache, stored galleries, CLI."""

import json

import faiss
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from xbt import InputError, load_backbone
from xbt.cli import main as cli
from xbt.demo.models import TinyClipConfig, build_hf_clip
from xbt.evaluation import EvalConfig, Space, evaluate, load_eval_set
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
    """A stand-in XBT model made of real parts: new backbone + projection into the old space, with blending."""

    def __init__(self, new, old, projection):
        self.new, self.old, self.projection = new, old, projection
        self.calls = 0

    def encode_text(self, texts, blend_old=None):
        self.calls += 1
        with torch.no_grad():
            vectors = self.projection(self.new.encode_text(texts))
        if blend_old:
            vectors = torch.nn.functional.normalize((1 - blend_old) * vectors + blend_old * self.old.encode_text(texts), dim=-1)
        return vectors

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


def _spaces(models, xbt=None):
    spaces = [Space("old", models["old"], models["old"].fingerprint), Space("new", models["new"], models["new"].fingerprint)]
    if xbt is not None:
        from xbt.evaluation import BlendedText

        spaces += [Space("xbt", xbt, "xbt-test"), Space("xbt+old", BlendedText("xbt", "old", 0.5), "xbt-test+old", ("text",))]
    return spaces


def test_eval_set_through_the_pair_loader_and_bad_sets(tmp_path, eval_folder):
    loaded = load_eval_set(eval_folder)
    assert len(loaded.ids) == 30 and loaded.ids.tolist() == list(range(30))  # file names: positions
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
    assert ided.ids.tolist() == [40, 47, 54, 61, 68]

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
    with pytest.raises(InputError, match="must hold integers"):
        load_eval_set(broken([{"file_name": "a.png", "caption": "x", "id": "a1"}], "text_ids"), id_column="id")
    with pytest.raises(InputError, match="metadata.jsonl"):
        load_eval_set(tmp_path)


def test_matrix_agrees_with_direct_computation_and_cache_is_reused(models, eval_folder, tmp_path):
    eval_set = load_eval_set(eval_folder)
    xbt = ProjectedModel(models["new"], models["old"], models["projection"])
    config = EvalConfig(ks=KS, fractions=(0.0, 0.5, 1.0))
    report = evaluate(eval_set, _spaces(models, xbt), {"lstsq": models["projection"]}, config=config,
                      cache_dir=tmp_path / "cache")
    cells = {(c["direction"], c["name"]): c for c in report["cells"]}
    assert set(cells) == {
        ("text→image", n) for n in ("old→old", "new→new", "xbt→old", "xbt+old→old", "lstsq→old", "old-denoised→old",
                                   "xbt→xbt", "lstsq→lstsq", "old→xbt", "xbt+old→xbt")
    } | {("image→text", n) for n in ("old→old", "new→new", "xbt→old", "lstsq→old", "xbt→xbt", "lstsq→lstsq", "old→xbt")}

    # Independent recomputation of a few cells straight from the encoders.
    owners = eval_set.caption_ids
    old_images = Labeled(models["old"].encode_image(_images(eval_set)).numpy(), eval_set.ids)
    xbt_texts = Labeled(xbt.encode_text(eval_set.texts).numpy(), owners)
    old_texts = Labeled(models["old"].encode_text(eval_set.texts).numpy(), owners)
    new_images = Labeled(models["new"].encode_image(_images(eval_set)).numpy(), eval_set.ids)
    expected = {("text→image", "xbt→old"): recall_at_k(xbt_texts, old_images, KS),
                ("image→text", "old→old"): recall_at_k(old_images, old_texts, KS),
                ("image→text", "new→new"): recall_at_k(new_images, Labeled(models["new"].encode_text(eval_set.texts).numpy(), owners), KS)}
    for key, recall in expected.items():
        assert cells[key]["recall"] == {str(k): v for k, v in recall.items()}
    old_old = cells[("text→image", "old→old")]["recall"]
    for k in ("1", "5", "10"):
        assert cells[("text→image", "xbt→old")]["compatible"][k] == (cells[("text→image", "xbt→old")]["recall"][k] > old_old[k])
    # The backfill curve runs from xbt→old (nothing re-embedded) to xbt→xbt (everything).
    for direction, curve in report["backfill"].items():
        assert [curve["recall"][k][0] for k in KS] == [cells[(direction, "xbt→old")]["recall"][str(k)] for k in KS]
        assert [curve["recall"][k][-1] for k in KS] == [cells[(direction, "xbt→xbt")]["recall"][str(k)] for k in KS]
    assert report["dataset"]["images"] == 30 and report["models"]["old"]["fingerprint"] == models["old"].fingerprint

    # Second run: every space comes from the cache (the stand-in model is not called), same numbers.
    calls = xbt.calls
    again = evaluate(eval_set, _spaces(models, xbt), {"lstsq": models["projection"]}, config=config,
                     cache_dir=tmp_path / "cache")
    assert xbt.calls == calls and again["cells"] == report["cells"]
    # Another set under the same cache: re-encoded, not confused with the first.
    other = load_eval_set(write_image_folder(tmp_path / "other", 12, seed=5))
    evaluate(other, _spaces(models, xbt), config=config, cache_dir=tmp_path / "cache")
    assert xbt.calls > calls


def test_stored_gallery_with_distractors_and_ids(models, tmp_path):
    folder = write_image_folder(tmp_path / "ided", 20, seed=1, first_id=1000)
    eval_set = load_eval_set(folder, id_column="id")
    old_images = models["old"].encode_image(_images(eval_set)).numpy()
    config = EvalConfig(ks=KS, fractions=(0.0, 1.0))
    plain = evaluate(eval_set, _spaces(models), config=config)

    # The same vectors stored in a shuffled faiss IDMap: identical numbers.
    order = np.random.default_rng(0).permutation(20)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(32))
    index.add_with_ids(old_images[order], eval_set.ids[order])
    faiss.write_index(index, str(tmp_path / "gallery.faiss"))
    from xbt.retrieval import load_embeddings

    stored = {"old": load_embeddings(tmp_path / "gallery.faiss")}
    same = evaluate(eval_set, _spaces(models), stored_galleries=stored, config=config)
    pick = lambda report: [c for c in report["cells"] if c["direction"] == "text→image"]  # noqa: E731
    assert pick(same) == pick(plain)

    # 500 distractors: text→image against old gets no easier; the report says the gallery is larger.
    distractors = np.random.default_rng(1).normal(size=(500, 32)).astype(np.float32)
    big = Labeled(np.concatenate([old_images, distractors]), np.concatenate([eval_set.ids, np.arange(500) + 10**6]))
    crowded = evaluate(eval_set, _spaces(models), stored_galleries={"old": big}, config=config)
    first = {c["name"]: c for c in pick(plain)}
    for cell in pick(crowded):
        if cell["gallery"] == "old":
            assert all(cell["recall"][k] <= first[cell["name"]]["recall"][k] for k in ("1", "5", "10"))
    assert crowded["dataset"]["stored"]["old (gallery)"]["items"] == 520

    # Ids that do not line up, or another dimension: refused before anything is encoded.
    class Refuse:
        embed_dim = 32

        def encode_text(self, texts):
            raise AssertionError("encoded before the input was checked")

        encode_image = encode_text

    spaces = [Space("old", Refuse(), None), Space("new", Refuse(), None)]
    with pytest.raises(InputError, match="line up"):
        evaluate(eval_set, spaces, stored_galleries={"old": Labeled(old_images, np.arange(20))}, config=config)
    with pytest.raises(InputError, match="dimension 16"):
        evaluate(eval_set, spaces, stored_galleries={"old": Labeled(old_images[:, :16], eval_set.ids)}, config=config)
    bad = old_images.copy()
    bad[3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        evaluate(eval_set, spaces, stored_galleries={"old": Labeled(bad, eval_set.ids)}, config=config)


@pytest.mark.slow
def test_cli_writes_every_output_for_models_and_a_projection_baseline(models, eval_folder, tmp_path, capsys):
    models["projection"].save_pretrained(tmp_path / "lstsq")
    output = tmp_path / "eval"
    assert cli(["eval", "--old", models["old_ref"], "--new", models["new_ref"], "--projection", f"lstsq={tmp_path / 'lstsq'}",
                "--eval-set", str(eval_folder), "--output", str(output), "--shard-rows", "7"]) == 0
    report = json.loads((output / "metrics.json").read_text())
    names = {c["name"] for c in report["cells"]}
    assert {"old→old", "new→new", "lstsq→old", "lstsq→lstsq", "old-denoised→old"} <= names
    assert report["models"]["new"]["reference"] == models["new_ref"] and report["baselines"] == ["lstsq"]
    lstsq = next(c for c in report["cells"] if c["name"] == "lstsq→old" and c["direction"] == "text→image")
    assert set(lstsq["gap_recovered"]) == {"1", "5", "10"}
    for plot in ("matrix.png", "recall_bars.png"):
        with Image.open(output / plot) as image:
            image.verify()
    assert "lstsq→old" in (output / "report.md").read_text() and "lstsq→old" in capsys.readouterr().out
    assert len(list((output / "cache").glob("*.safetensors"))) == 4  # old/new × text/image; baselines not cached

    # A projection made for other models is refused.
    stranger = Projection.from_linear_map(torch.zeros(32, 48), source_space="hf-0000", target_space=None)
    stranger.save_pretrained(tmp_path / "stranger")
    assert cli(["eval", "--old", models["old_ref"], "--new", models["new_ref"], "--projection", f"s={tmp_path / 'stranger'}",
                "--eval-set", str(eval_folder), "--output", str(tmp_path / "x")]) == 2
    assert "trained for the new model hf-0000" in capsys.readouterr().err


def test_cli_refuses_a_folder_that_is_no_adapter(models, eval_folder, tmp_path, capsys):
    (tmp_path / "adapter").mkdir()
    assert cli(["eval", "--old", models["old_ref"], "--new", models["new_ref"], "--adapter", str(tmp_path / "adapter"),
                "--eval-set", str(eval_folder), "--output", str(tmp_path / "out")]) == 2
    assert "is not an xbt adapter directory" in capsys.readouterr().err


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
    assert cli(["eval", "--gallery", f"old={tmp_path / 'old.npy'}", "--gallery", f"xbt={tmp_path / 'xbt.npy'}",
                "--gallery-ids", str(tmp_path / "ids.npy"), "--queries", f"old={tmp_path / 'q_old.npy'}",
                "--queries", f"xbt={tmp_path / 'q_xbt.npy'}", "--query-ids", str(tmp_path / "qids.npy"),
                "--output", str(output)]) == 0
    report = json.loads((output / "metrics.json").read_text())
    assert [c["name"] for c in report["cells"]] == ["old→old", "xbt→old", "xbt→xbt", "old→xbt"]
    assert report["backfill"]["text→image"]["recall"]["1"][-1] == report["cells"][2]["recall"]["1"]
    with Image.open(output / "backfill.png") as image:
        image.verify()
    assert "**stored old (gallery)**: 300 vectors of dimension 16" in (output / "report.md").read_text()
    np.save(tmp_path / "qids_bad.npy", ids[targets] + 1)
    assert cli(["eval", "--gallery", f"old={tmp_path / 'old.npy'}", "--gallery-ids", str(tmp_path / "ids.npy"),
                "--queries", f"old={tmp_path / 'q_old.npy'}", "--query-ids", str(tmp_path / "qids_bad.npy"),
                "--output", str(output)]) == 2
    assert "line up" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_on_a_tiny_real_adapter(models, eval_folder, tmp_path):
    import copy

    from xbt.model import XBTModel

    model = XBTModel(load_backbone(models["new_ref"]), copy.deepcopy(models["projection"]), old_reference=models["old_ref"])
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero: give the adapter an effect of its own
        for parameter in model.lora_parameters():
            parameter.normal_(std=0.05)
    model.save_pretrained(tmp_path / "adapter")
    output = tmp_path / "eval"
    assert cli(["eval", "--old", models["old_ref"], "--new", models["new_ref"], "--adapter", str(tmp_path / "adapter"),
                "--eval-set", str(eval_folder), "--output", str(output), "--blend-alpha", "0.3"]) == 0
    report = json.loads((output / "metrics.json").read_text())
    cells = {(c["direction"], c["name"]): c for c in report["cells"]}
    assert {("text→image", n) for n in ("xbt→old", "xbt+old→old", "xbt→xbt", "old→xbt", "xbt+old→xbt")} <= set(cells)
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
    assert report["models"]["xbt+old"]["blend_alpha"] == 0.3
