"""Generated benchmarks: deterministic, real PNG files, metadata that matches them, a text corpus."""

import json

import numpy as np
import pytest
from PIL import Image

from xbt import InputError
from xbt.demo.scenes import (CAPTIONS_PER_IMAGE, DOMAINS, IMAGE_SIZE, BenchmarkConfig, generate, generate_captions,
                             read_split, write_benchmark, write_split)


@pytest.fixture(params=sorted(DOMAINS))
def domain(request) -> str:
    return request.param


def test_same_seed_same_items_other_seed_other_items(domain):
    images, captions = generate(domain, 6, seed=3)
    again_images, again_captions = generate(domain, 6, seed=3)
    other_images, other_captions = generate(domain, 6, seed=4)
    assert captions == again_captions and captions != other_captions
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again_images))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(other_images[0]))
    # Item i does not depend on how many items are generated.
    assert generate(domain, 3, seed=3)[1] == captions[:3]


def test_images_have_several_distinct_paraphrases(domain):
    images, captions = generate(domain, 50, seed=0)
    assert all(image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB" for image in images)
    assert all(len(group) == CAPTIONS_PER_IMAGE and len(set(group)) == CAPTIONS_PER_IMAGE for group in captions)
    assert all(caption == caption.strip() and "  " not in caption for group in captions for caption in group)
    assert len({caption for group in captions for caption in group}) > 200  # scenes differ


def test_the_two_domains_differ():
    shapes, shape_captions = generate("shapes", 20, seed=0)
    patterns, pattern_captions = generate("patterns", 20, seed=0)
    assert not set(sum(shape_captions, [])) & set(sum(pattern_captions, []))
    # Shapes sit on a mostly plain background; patterns alternate colours everywhere.
    shape_edges = np.mean([np.abs(np.diff(np.asarray(i, dtype=float), axis=1)).mean() for i in shapes])
    pattern_edges = np.mean([np.abs(np.diff(np.asarray(i, dtype=float), axis=1)).mean() for i in patterns])
    assert pattern_edges > shape_edges


def test_written_split_is_png_files_with_matching_metadata(domain, tmp_path):
    folder = write_split(tmp_path / "train", domain, 12, seed=1)
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["file_name"] for r in records] == sorted(p.name for p in folder.glob("*.png"))
    images, captions = generate(domain, 12, seed=1)
    for record, image, group in zip(records, images, captions):
        with Image.open(folder / record["file_name"]) as file:
            assert file.format == "PNG"
            assert np.array_equal(np.asarray(file.convert("RGB")), np.asarray(image))  # lossless, same pixels
        assert record["captions"] == group
    paths, read_captions = read_split(folder)
    assert [p.name for p in paths] == [r["file_name"] for r in records] and read_captions == captions


def test_benchmark_splits_are_disjoint_and_rewriting_is_skipped(tmp_path):
    config = BenchmarkConfig(domain="shapes", train_images=20, test_images=10, corpus_captions=300, seed=0)
    paths = write_benchmark(tmp_path, config)
    train, test = read_split(paths["train"])[1], read_split(paths["test"])[1]
    assert len(train) == 20 and len(test) == 10 and train[:10] != test
    corpus = paths["corpus"].read_text().split("\n")
    assert corpus[-1] == "" and len(corpus[:-1]) == 300 and all(line.strip() for line in corpus[:-1])
    assert len(corpus) > 5 * len(train)  # far more captions than training images
    stamp = (paths["train"] / "000000.png").stat().st_mtime_ns
    write_benchmark(tmp_path, config)
    assert (paths["train"] / "000000.png").stat().st_mtime_ns == stamp  # cached, not regenerated
    write_benchmark(tmp_path, BenchmarkConfig(domain="shapes", train_images=25, test_images=10,
                                              corpus_captions=300, seed=0))
    assert len(read_split(paths["train"])[0]) == 25  # another config regenerates


def test_corpus_is_deterministic_with_no_empty_lines(domain):
    corpus = generate_captions(domain, 1000, seed=2)
    assert corpus == generate_captions(domain, 1000, seed=2) and len(corpus) == 1000
    assert all(line.strip() and "\n" not in line for line in corpus)


def test_unknown_domain_and_missing_metadata_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="Unknown scene domain 'faces'.*shapes"):
        generate("faces", 1)
    with pytest.raises(InputError, match="no metadata.jsonl"):
        read_split(tmp_path)


def test_the_stage2_pair_loader_reads_a_written_split(tmp_path):
    from xbt.data.pairs import PairDataConfig, open_pairs

    folder = write_split(tmp_path / "test", "patterns", 5, seed=0, split="test")
    source = open_pairs(PairDataConfig(source=str(folder)))
    assert source.format == "folder" and source.captions == read_split(folder)[1]
    assert np.array_equal(np.asarray(source.images.load(2)), np.asarray(generate("patterns", 3, split="test")[0][2]))
