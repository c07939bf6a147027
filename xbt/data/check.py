"""``xbt check-pairs``: read an image-text source once, decoding every image, and report what is unusable.

Run it before a long training job: it fails with the same error the job would, but
in minutes, and lists the files to fix.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..config import parse_configs
from .config import PairDataConfig

if TYPE_CHECKING:
    from .quality import DataQuality


def scan(config: PairDataConfig) -> DataQuality:
    """Decode every example of ``config``'s source once; returns the counts (does not raise for the fraction)."""
    from tqdm import tqdm  # imported late: the console script may switch its bars off first

    from .pairs import make_pair_loader, open_pairs

    source = open_pairs(config)
    quality = source.new_quality()
    quality.expected_total = None  # count everything, judge at the end
    total = None if source.streamed else len(source)
    with tqdm(total=total, unit="img", desc="checking pairs") as progress:
        for batch in make_pair_loader(source):
            quality.update(batch)
            progress.update(len(batch["ids"]) + len(batch["bad"]))
    return quality


def main(argv: Sequence[str]) -> int:
    """``xbt check-pairs --source PATH_OR_NAME [options]``: JSON summary on stdout; exit 2 if too much is bad."""
    (config,) = parse_configs([PairDataConfig], argv, prog="xbt check-pairs", description=__doc__)
    quality = scan(config)
    print(json.dumps(quality.to_dict(), indent=2))
    quality.finish()  # raises InputError (exit 2 through the CLI) past max_bad_fraction
    return 0
