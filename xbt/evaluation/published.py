"""Published reference numbers shown beside a run's own (``xbt eval --reference_numbers PROTOCOL``).

A file of protocols (``reference_numbers.yaml`` beside this module, package data) maps each name to
where the numbers were published, the models and evaluation set they were measured with,
the K they are Recall@K for, and the numbers by cell name and direction::

    flickr30k:
      source: SLERP's re-report of XBT (Table 1)
      eval_set: Flickr30k full (union of the Karpathy splits)
      old_model: open_clip:ViT-B-32/openai
      new_model: open_clip:ViT-L-14/openai
      k: 1
      recall:
        old→old: {image→text: 40.62, text→image: 21.73}

The evaluation report then carries ``published`` ({K: value}) on each cell that has a number
and the protocol itself under ``report["published"]``; ``same_models`` says whether the run
used the protocol's models (a run with other models is shown the numbers as a landmark only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from .plan import DIRECTIONS

# Shipped with the package (any install, not only a checkout); other files are named as FILE:PROTOCOL.
DEFAULT_FILE = Path(__file__).with_name("reference_numbers.yaml")
FIELDS = ("source", "eval_set", "old_model", "new_model", "k", "recall")


@dataclass(frozen=True)
class Published:
    """One protocol's published numbers: ``recall[cell name][direction]`` is R@``k`` in percent."""

    protocol: str
    source: str
    eval_set: str
    old_model: str
    new_model: str
    k: int
    recall: dict[str, dict[str, float]]


def load_published(spec: str) -> Published:
    """The protocol named by ``spec``: ``PROTOCOL`` (in :data:`DEFAULT_FILE`) or ``FILE.yaml:PROTOCOL``."""
    from ..config import read_config_file

    path, sep, protocol = spec.rpartition(":")
    path = Path(path) if sep else DEFAULT_FILE
    where = f"--reference_numbers {spec!r}"
    protocols = read_config_file(path)
    if protocol not in protocols:
        raise InputError(f"{where}: {str(path)!r} has no protocol {protocol!r} (protocols: {sorted(protocols)}).")
    entry = protocols[protocol]
    missing = [name for name in FIELDS if not isinstance(entry, dict) or name not in entry]
    if missing:
        raise InputError(f"{where}: protocol {protocol!r} lacks {missing} (each protocol needs {list(FIELDS)}).")
    recall = entry["recall"]
    for cell, numbers in recall.items():
        if not isinstance(numbers, dict) or not set(numbers) <= set(DIRECTIONS) or not all(
                isinstance(value, (int, float)) for value in numbers.values()):
            raise InputError(f"{where}: recall of cell {cell!r} must map directions {list(DIRECTIONS)} to numbers, "
                             f"got {numbers!r}.")
    return Published(protocol, **{name: entry[name] for name in FIELDS})


def attach_published(report: dict, published: Published, old_model: str | None, new_model: str | None) -> None:
    """Put each matching cell's published number on it (``cell["published"]``) and the protocol on the report."""
    for cell in report["cells"]:
        value = published.recall.get(cell["name"], {}).get(cell["direction"])
        if value is not None:
            cell["published"] = {str(published.k): float(value)}
    report["published"] = {**asdict(published),
                           "same_models": (old_model, new_model) == (published.old_model, published.new_model)}


def describe(report: dict) -> str | None:
    """One line naming the published numbers of a report (None without any), for the printed table."""
    info: dict[str, Any] | None = report.get("published")
    if info is None:
        return None
    models = f"{info['old_model']} (old), {info['new_model']} (new)"
    caveat = "" if info["same_models"] else "; this run used other models, so they are a landmark only"
    return f"published R@{info['k']}: {info['source']}, {info['eval_set']}, {models}{caveat}"
