"""Caption corpora from real files of every supported format, through `datasets`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from xbt.data.captions import CaptionConfig, load_captions, split_indices, texts_fingerprint
from xbt.errors import InputError

RAW = ["a red square", "  a blue circle ", "", "a red square", "   ", "a green triangle on grass",
       "a blue circle", "two yellow stars", "a cat on a mat", "a dog in the snow"]
KEPT = ["a red square", "a blue circle", "a green triangle on grass", "two yellow stars", "a cat on a mat",
        "a dog in the snow"]


def write_corpus(folder, fmt: str, column: str = "caption"):
    path = folder / f"captions.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(RAW) + "\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({column: text, "id": i}) + "\n" for i, text in enumerate(RAW)))
    elif fmt == "csv":
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", column])
            writer.writerows(enumerate(RAW))
    elif fmt == "parquet":
        import datasets

        datasets.Dataset.from_dict({"id": list(range(len(RAW))), column: RAW}).to_parquet(str(path))
    return path


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "parquet"])
def test_every_format_is_cleaned_and_split(tmp_path, fmt):
    path = write_corpus(tmp_path, fmt)
    corpus = load_captions(CaptionConfig(captions=str(path), column="caption", validation_size=2, split_seed=3))
    assert corpus.texts == KEPT
    # csv turns the empty cells into missing values; both count as empty captions
    assert corpus.dropped_empty == 2 and corpus.dropped_duplicates == 2
    assert len(corpus.validation) == 2 and len(corpus.train) == len(KEPT) - 2
    assert sorted(corpus.train + corpus.validation) == sorted(KEPT)
    assert corpus.fingerprint == texts_fingerprint(KEPT)
    assert corpus.summary()["captions"] == len(KEPT)


def test_split_is_seeded_and_recomputable():
    train, validation = split_indices(100, 0.1, seed=7)
    assert len(validation) == 10 and not set(train) & set(validation)
    again_train, again_validation = split_indices(100, 0.1, seed=7)
    assert np.array_equal(train, again_train) and np.array_equal(validation, again_validation)
    assert not np.array_equal(validation, split_indices(100, 0.1, seed=8)[1])


def test_fingerprint_depends_on_content_and_order():
    assert texts_fingerprint(["ab", "c"]) != texts_fingerprint(["a", "bc"])
    assert texts_fingerprint(["a", "b"]) != texts_fingerprint(["b", "a"])


def test_max_captions(tmp_path):
    corpus = load_captions(CaptionConfig(captions=str(write_corpus(tmp_path, "txt")), max_captions=4,
                                         validation_size=1))
    assert corpus.texts == KEPT[:4]


def test_missing_column_names_the_columns(tmp_path):
    path = write_corpus(tmp_path, "jsonl")
    with pytest.raises(InputError, match=r"no column 'text'.*\['caption', 'id'\]|no column 'text'.*\['id', 'caption'\]"):
        load_captions(CaptionConfig(captions=str(path), column="text"))


def test_non_text_column_is_refused(tmp_path):
    path = write_corpus(tmp_path, "jsonl")
    with pytest.raises(InputError, match="not text"):
        load_captions(CaptionConfig(captions=str(path), column="id"))


def test_missing_unreadable_and_empty_inputs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_captions(CaptionConfig(captions=str(tmp_path / "nope.txt")))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"this is not parquet at all")
    with pytest.raises(InputError, match="Could not read captions"):
        load_captions(CaptionConfig(captions=str(broken)))
    unknown = tmp_path / "captions.xml"
    unknown.write_text("<a/>")
    with pytest.raises(InputError, match="unknown format"):
        load_captions(CaptionConfig(captions=str(unknown)))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    with pytest.raises(InputError, match="no usable captions"):
        load_captions(CaptionConfig(captions=str(blank)))
    with pytest.raises(InputError, match="No caption corpus"):
        load_captions(CaptionConfig(captions=""))


def test_validation_slice_must_leave_training_captions(tmp_path):
    with pytest.raises(InputError, match="leaves no training captions"):
        load_captions(CaptionConfig(captions=str(write_corpus(tmp_path, "txt")), validation_size=6))


def test_unknown_hub_dataset_is_a_clear_error_offline():
    with pytest.raises(InputError, match="Hub dataset 'no-such-org/no-such-captions'"):
        load_captions(CaptionConfig(captions="no-such-org/no-such-captions"))
