"""Millions of short strings without millions of Python objects.

DataLoader workers are forked copies of the main process. Reading a Python list of
strings in a worker writes to every touched object's reference count, so the pages
are copied and each worker slowly duplicates the whole list (memory that grows with
workers and epochs). Strings packed into one UTF-8 buffer plus offsets, both numpy
arrays, are shared by the workers untouched, and pickle compactly for spawned ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


class PackedStrings:
    """A read-only list of strings held in two numpy arrays."""

    def __init__(self, strings: Iterable[str]):
        encoded = [text.encode("utf-8") for text in strings]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(data) for data in encoded], out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        return self.buffer[self.offsets[index]:self.offsets[index + 1]].tobytes().decode("utf-8")

    def __iter__(self):
        return (self[index] for index in range(len(self)))


class PackedCaptions:
    """A read-only list of caption lists: the flat captions packed, plus where each list starts."""

    def __init__(self, lists: Sequence[Sequence[str]]):
        self.texts = PackedStrings(text for captions in lists for text in captions)
        self.starts = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum([len(captions) for captions in lists], out=self.starts[1:])

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, index: int) -> list[str]:
        return [self.texts[position] for position in range(self.starts[index], self.starts[index + 1])]
