"""The paper recipes of configs/paper: every file parses and validates through the real CLI code path, and
each recipe's data fields, pointed at local copies with the Hub datasets' schemas, read the right split.

The local copies mirror the columns, nesting, split field and image feature of ``nlphuji/flickr30k``
(one Hub split, Karpathy's split in a column, five captions in a list) and ``bitmind/MS-COCO`` (one
row per caption, the text in the ``sentences`` struct, restval rows inside the Hub ``train`` split),
with tiny real PNGs whose colour says which image a loader returned. Nothing is fetched.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from xbt.config import parse_configs
from xbt.data.captions import load_captions
from xbt.data.config import CaptionConfig, PairDataConfig
from xbt.data.pairs import open_pairs
from xbt.errors import InputError
from xbt.eval_cli import EvalArguments, main as eval_main, open_eval_set
from xbt.evaluation.published import load_published
from xbt.train.fit import config_from, plan

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"


# ----------------------------------------------------------------------------- local copies of the Hub datasets

def png(index: int) -> bytes:
    """A tiny real PNG whose colour encodes ``index``."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), color_of(index)).save(buffer, format="PNG")
    return buffer.getvalue()


def color_of(index: int) -> tuple[int, int, int]:
    return (index * 17 % 256, index * 53 % 256, 200)


# (image number, Karpathy split) of each copy. "other" stands for images outside every Karpathy split
# (the Hub copy of Flickr30k holds 31,783 images, the Karpathy splits 31,014).
FLICKR_IMAGES = [(0, "train"), (1, "train"), (2, "val"), (3, "test"), (4, "test"), (5, "other")]
# Hub split -> images; the Hub train split holds Karpathy train AND restval.
COCO_IMAGES = {"train": [(10, "train"), (11, "restval"), (12, "train"), (13, "restval")],
               "validation": [(14, "val"), (15, "val")], "test": [(16, "test"), (17, "test")]}


def flickr_captions(number: int) -> list[str]:
    return [f"flickr image {number} caption {k}" for k in range(5)]


def coco_captions(number: int) -> list[str]:
    return [f"coco image {number} caption {k}" for k in range(5)]


def build_flickr30k(folder: Path) -> Path:
    """``nlphuji/flickr30k``'s schema: one split ``test``, one row per image."""
    rows = {"image": [{"bytes": png(n), "path": f"{n}.jpg"} for n, _ in FLICKR_IMAGES],
            "caption": [flickr_captions(n) for n, _ in FLICKR_IMAGES],
            "sentids": [[str(5 * n + k) for k in range(5)] for n, _ in FLICKR_IMAGES],
            "split": [split for _, split in FLICKR_IMAGES],
            "img_id": [str(n) for n, _ in FLICKR_IMAGES],
            "filename": [f"{n}.jpg" for n, _ in FLICKR_IMAGES]}
    features = datasets.Features({"image": datasets.Image(), "caption": [datasets.Value("string")],
                                  "sentids": [datasets.Value("string")], "split": datasets.Value("string"),
                                  "img_id": datasets.Value("string"), "filename": datasets.Value("string")})
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(folder))
    return folder


def build_coco(folder: Path) -> Path:
    """``bitmind/MS-COCO``'s schema: splits train / validation / test, one row per caption."""
    features = datasets.Features({
        "image": datasets.Image(), "filepath": datasets.Value("string"), "sentids": [datasets.Value("int64")],
        "filename": datasets.Value("string"), "imgid": datasets.Value("int64"), "split": datasets.Value("string"),
        "sentences": {"tokens": [datasets.Value("string")], "raw": datasets.Value("string"),
                      "imgid": datasets.Value("int64"), "sentid": datasets.Value("int64")},
        "cocoid": datasets.Value("int64")})
    splits = {}
    for hub_split, images in COCO_IMAGES.items():
        rows = [{"image": {"bytes": png(n), "path": f"COCO_{n}.jpg"}, "filepath": "val2014",
                 "sentids": [5 * n + k for k in range(5)], "filename": f"COCO_{n}.jpg", "imgid": n, "split": split,
                 "sentences": {"tokens": caption.split(), "raw": caption, "imgid": n, "sentid": 5 * n + k},
                 "cocoid": 1000 + n}
                for n, split in images for k, caption in enumerate(coco_captions(n))]
        splits[hub_split] = datasets.Dataset.from_list(rows, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def local_copies(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub_copies")
    return {"flickr30k": build_flickr30k(root / "flickr30k"), "coco": build_coco(root / "coco")}


def expected(copy: str, splits: set[str]) -> dict[str, tuple[list[str], tuple[int, int, int]]]:
    """id -> (captions, colour) of the images of ``copy`` in the Karpathy ``splits``."""
    if copy == "flickr30k":
        return {str(n): (flickr_captions(n), color_of(n)) for n, split in FLICKR_IMAGES if split in splits}
    return {str(1000 + n): (coco_captions(n), color_of(n)) for images in COCO_IMAGES.values()
            for n, split in images if split in splits}


# ----------------------------------------------------------------------------- one checker for every recipe file

def check_pairs(source, copy: str, splits: set[str]) -> None:
    """The opened pairs are exactly the images of ``splits``: one item per image, its captions, its pixels."""
    want = expected(copy, splits)
    assert sorted(source.ids) == sorted(want)
    for position, (image_id, captions) in enumerate(zip(source.ids, source.captions)):
        assert captions == want[image_id][0]
        assert source.images.load(position).convert("RGB").getpixel((0, 0)) == want[image_id][1]


def check_fit(path: Path, copy: Path, kind: str, splits: set[str], tmp_path: Path) -> None:
    """A fit file: config_from + plan (references parsed, not loaded); stage 1 and stage 2 data read locally."""
    as_written = plan(config_from(path))
    assert as_written.stage2[1].source == as_written.stage1[0].captions  # both stages name the same Hub dataset
    checked = plan(config_from(path, [f"--stage1.captions={copy}", f"--stage2.source={copy}",
                                      f"--run_dir={tmp_path / 'run'}"]))
    captions: CaptionConfig = checked.stage1[0]
    corpus = load_captions(CaptionConfig(**{**asdict(captions), "validation_size": 1}))
    assert sorted(corpus.texts) == sorted(text for texts, _ in expected(kind, splits).values() for text in texts)
    check_pairs(open_pairs(PairDataConfig(**asdict(checked.stage2[1]))), kind, splits)  # as stage 2 opens it


def check_eval(path: Path, copy: Path, kind: str, splits: set[str], tmp_path: Path) -> None:
    """An eval file: xbt eval's own argument parsing, then its own opening of the evaluation set."""
    (as_written,) = parse_configs([EvalArguments], ["--config", str(path)], prog="xbt eval", description=None)
    trained = config_from(PAPER / "fit/b32-to-l14.yaml")  # the run an eval file names: its models and adapter
    assert (as_written.old_model, as_written.new_model, as_written.adapter) == (
        trained.old_model, trained.new_model, f"{trained.run_dir}/stage2/adapter")
    if as_written.reference_numbers:
        published = load_published(as_written.reference_numbers)
        assert (published.old_model, published.new_model) == (trained.old_model, trained.new_model)
    (args,) = parse_configs([EvalArguments], ["--config", str(path), "--eval_set", str(copy)], prog="xbt eval",
                            description=None)
    check_pairs(open_eval_set(args).source, kind, splits)


# One row per file under configs/paper: its checker, the local copy its data fields point at, the Karpathy splits.
RECIPES = {
    "fit/b32-to-l14.yaml": (check_fit, "coco", {"train"}),
    "fit/b32-to-h14.yaml": (check_fit, "coco", {"train"}),
    "eval/flickr30k-full.yaml": (check_eval, "flickr30k", {"train", "val", "test"}),
    "eval/flickr30k-karpathy-test.yaml": (check_eval, "flickr30k", {"test"}),
    "eval/coco-karpathy-test.yaml": (check_eval, "coco", {"test"}),
    "eval/coco-val-restval.yaml": (check_eval, "coco", {"val", "restval"}),
}


def test_every_recipe_file_has_a_row():
    files = {str(path.relative_to(PAPER)) for path in PAPER.rglob("*.yaml")}
    assert files == set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe(name, local_copies, tmp_path):
    checker, kind, splits = RECIPES[name]
    checker(PAPER / name, local_copies[kind], kind, splits, tmp_path)


def test_open_clip_references_name_installed_pretrained_tags():
    import open_clip

    from xbt.config import read_config_file
    from xbt.references import parse_reference

    references = {read_config_file(PAPER / name)[key] for name in RECIPES for key in ("old_model", "new_model")}
    assert {"open_clip:ViT-B-32/openai", "open_clip:ViT-L-14/openai",
            "open_clip:ViT-H-14/laion2b_s32b_b79k"} == references
    for reference in references:
        parsed = parse_reference(reference)
        assert parsed.pretrained in open_clip.list_pretrained_tags_by_model(parsed.name), reference


def test_published_numbers():
    flickr, coco = load_published("flickr30k"), load_published("coco")
    assert flickr.recall["xbt→old"] == {"image→text": 42.47, "text→image": 22.38} and flickr.k == 1
    assert coco.recall["new→new"] == {"image→text": 34.33, "text→image": 18.68}
    with pytest.raises(InputError, match="no protocol 'nocaps'.*'coco', 'flickr30k'"):
        load_published("nocaps")


def test_eval_prints_published_column(tmp_path, capsys):
    """xbt eval --reference_numbers: a published column beside the run's own R@1, and in metrics.json."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(20, 8)).astype(np.float32)
    np.save(tmp_path / "gallery.npy", images)
    np.save(tmp_path / "old.npy", images + rng.normal(scale=2.0, size=images.shape).astype(np.float32))
    np.save(tmp_path / "xbt.npy", images + rng.normal(scale=0.5, size=images.shape).astype(np.float32))
    assert eval_main(["--galleries", f"old={tmp_path / 'gallery.npy'}", "--queries", f"old={tmp_path / 'old.npy'}",
                      f"xbt={tmp_path / 'xbt.npy'}", "--output_dir", str(tmp_path / "eval"),
                      "--reference_numbers", "flickr30k"]) == 0
    printed = capsys.readouterr().out
    assert "published R@1: SLERP re-report" in printed and "landmark only" in printed
    assert any("old→old" in line and "published 21.73" in line for line in printed.splitlines())
    assert any("xbt→old" in line and "published 22.38" in line for line in printed.splitlines())
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {cell["name"]: cell["published"] for cell in metrics["cells"]} == {"old→old": {"1": 21.73},
                                                                              "xbt→old": {"1": 22.38}}
    assert metrics["published"]["protocol"] == "flickr30k" and metrics["published"]["same_models"] is False
    markdown = (tmp_path / "eval" / "report.md").read_text()  # the report has the column too
    assert "published R@1: SLERP re-report" in markdown
    rows = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in markdown.splitlines()
            if line.startswith("| `")}
    assert rows == {"`old→old`": "21.73", "`xbt→old`": "22.38"} and "| published R@1 |" in markdown


# ----------------------------------------------------------------------------- bad input: one line each

BAD = [
    ({"split_column": "split", "split_values": ["nope"]},
     r"no row has split in \['nope'\] \(values found: \['other', 'test', 'train', 'val'\]\)"),
    ({"split_column": "karpathy", "split_values": ["test"]}, "no split column 'karpathy'"),
    ({"split_column": "split"}, "split_column 'split' needs split_values"),
    ({"split_values": ["test"]}, "need split_column"),
    ({"caption_column": "caption.raw"}, "column 'caption' has no field 'raw'"),
    ({"caption_column": "sentences.raw"}, "no caption column 'sentences.raw'"),
    ({"split": "test+val"}, r"has no split 'val' \(splits: \['test'\]\)"),
]


@pytest.mark.parametrize("options,message", BAD)
def test_bad_split_and_column_options(options, message, local_copies):
    with pytest.raises(InputError, match=message) as error:
        open_pairs(PairDataConfig(source=str(local_copies["flickr30k"]), **{"split": "test", **options}))
    assert "\n" not in str(error.value)


def test_bad_caption_corpus_options(local_copies):
    corpus = dict(captions=str(local_copies["coco"]), column="sentences.raw", validation_size=1)
    with pytest.raises(InputError, match="no row has split in"):
        load_captions(CaptionConfig(**corpus, split_column="split", split_values=["restval"], split="validation"))
    with pytest.raises(InputError, match="column 'sentences' has no field 'text'"):
        load_captions(CaptionConfig(**{**corpus, "column": "sentences.text"}))


def test_eval_recipe_with_an_empty_split_is_one_error_line(local_copies, capsys):
    from xbt.cli import main as cli_main

    assert cli_main(["eval", "--config", str(PAPER / "eval/coco-karpathy-test.yaml"), "--eval_set",
                     str(local_copies["coco"]), "--split_values", "testing"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("xbt eval: error: ") and error.count("\n") == 1
    assert "no row has split in ['testing'] (values found: ['test'])" in error


def test_split_column_of_an_image_folder(tmp_path):
    for number in range(3):
        (tmp_path / f"{number}.png").write_bytes(png(number))
    (tmp_path / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{n}.png", "caption": f"caption {n}", "split": s}) + "\n"
        for n, s in enumerate(["train", "test", "test"])))
    source = open_pairs(PairDataConfig(source=str(tmp_path), split_column="split", split_values=["test"]))
    assert source.ids == ["1.png", "2.png"] and source.captions == [["caption 1"], ["caption 2"]]
    with pytest.raises(InputError, match="tar shards have no columns"):
        open_pairs(PairDataConfig(source=str(tmp_path / "a.tar"), format="webdataset", split_column="split",
                                  split_values=["test"]))
