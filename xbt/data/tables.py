"""Reading public benchmark tables as they are published: shared by pair sources and caption corpora.

Public copies of the retrieval benchmarks keep their protocol inside the table rather
than in the dataset's splits, so one reader serves both stage 1 and stage 2 and evaluation:

- splits as a column: ``nlphuji/flickr30k`` is one Hub split whose ``split`` column holds the
  Karpathy split of each image (``split_column: split``, ``split_values: [test]``);
- several Hub (or ``save_to_disk``) splits read as one: ``train+validation``, the spelling
  ``datasets.load_dataset`` accepts (COCO's restval images live in the Hub ``train`` split);
- a field of a struct column: ``sentences.raw`` is the ``raw`` field of COCO's per-caption
  ``sentences`` struct (the column name ``Dataset.flatten()`` gives it).

Every problem is a one-line :class:`~xbt.errors.InputError` naming the table, the column and
what it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError


def select_split(dataset: Any, split: str, where: str) -> Any:
    """``split`` of a ``DatasetDict`` (``a+b`` concatenates splits); a plain ``Dataset`` is returned as it is."""
    import datasets

    if not isinstance(dataset, datasets.DatasetDict):
        return dataset
    names = [name.strip() for name in split.split("+")]
    for name in names:
        if name not in dataset:
            raise InputError(f"{where} has no split {name!r} (splits: {sorted(dataset)}).")
    parts = [dataset[name] for name in names]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


@dataclass(kw_only=True)
class SplitRows:
    """Options of every table reader: which rows to read when a table holds its splits in a column."""

    split_column: str | None = field(default=None, metadata={
        "help": "column holding each row's split (e.g. Karpathy's 'split'); only the rows in split_values are read"})
    split_values: list[str] = field(default_factory=list, metadata={
        "help": "values of split_column to read, e.g. test, or val restval"})

    def __post_init__(self) -> None:
        if self.split_column is not None and not self.split_values:
            raise InputError(f"split_column {self.split_column!r} needs split_values: the values of the rows to "
                             "keep, e.g. [test] or [val, restval].")
        if self.split_values and self.split_column is None:
            raise InputError(f"split_values {list(self.split_values)} need split_column: the column holding each "
                             "row's split.")


def filter_split(table: Any, split_column: str | None, split_values: Sequence[str], where: str) -> Any:
    """The rows of ``table`` whose ``split_column`` is one of ``split_values`` (all rows without a split column)."""
    if split_column is None:
        return table
    if split_column not in table.column_names:
        raise InputError(f"{where} has no split column {split_column!r} (columns: {table.column_names}).")
    values = [str(value) for value in table[split_column]]  # YAML may read a split name as a number
    wanted = {str(value) for value in split_values}
    keep = [row for row, value in enumerate(values) if value in wanted]
    if not keep:
        raise InputError(f"{where}: no row has {split_column} in {sorted(wanted)} "
                         f"(values found: {sorted(set(values))[:20]}).")
    return table.select(keep)


def has_column(name: str, columns: Sequence[str]) -> bool:
    """Whether ``name`` is one of ``columns`` or a field (``column.field``) of one of them."""
    return name in columns or ("." in name and name.partition(".")[0] in columns)


def read_column(table: Any, name: str, where: str) -> list:
    """The values of column ``name`` of a ``datasets.Dataset``; ``column.field`` reads a field of a struct column."""
    if name in table.column_names:
        return table[name]
    root, _, field = name.partition(".")
    if root not in table.column_names:
        raise InputError(f"{where} has no column {name!r} (columns: {table.column_names}).")
    fields = table.features[root]  # a struct's features are a dict of its fields
    if not isinstance(fields, dict) or field not in fields:
        raise InputError(f"{where}: column {root!r} has no field {field!r} "
                         f"(fields: {list(fields) if isinstance(fields, dict) else []}).")
    # Read through the struct, not Dataset.flatten(): a flattened concatenation of splits loses its columns
    # in datasets 5.2 (KeyError on read).
    return [None if cell is None else cell[field] for cell in table[root]]
