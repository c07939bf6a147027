"""``xbt check-pairs``: read an image-text source once, decoding every image, and report what is unusable.

Run it before a long training job: it fails with the same error the job would, but
in minutes, and lists the files to fix.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from tqdm import tqdm
from transformers import HfArgumentParser

from .pairs import PairDataConfig, make_pair_loader, open_pairs
from .quality import DataQuality


def scan(config: PairDataConfig) -> DataQuality:
    """Decode every example of ``config``'s source once; returns the counts (does not raise for the fraction)."""
    source = open_pairs(config)
    quality = source.new_quality()
    quality.expected_total = None  # count everything, judge at the end
    total = None if source.streamed else len(source)
    with tqdm(total=total, unit="img", desc="checking pairs", disable=None) as progress:
        for batch in make_pair_loader(source):
            quality.update(batch)
            progress.update(len(batch["ids"]) + len(batch["bad"]))
    return quality


def main(argv: Sequence[str]) -> int:
    """``xbt check-pairs --source PATH_OR_NAME [options]``: JSON summary on stdout; exit 2 if too much is bad."""
    parser = HfArgumentParser(PairDataConfig, prog="xbt check-pairs", description=__doc__)
    (config,) = parser.parse_args_into_dataclasses(
        args=list(argv), look_for_args_file=False)
    quality = scan(config)
    print(json.dumps(quality.to_dict(), indent=2))
    quality.finish()  # raises InputError (exit 2 through the CLI) past max_bad_fraction
    return 0
