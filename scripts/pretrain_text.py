"""Stage 1 as a script: ``python scripts/pretrain_text.py ARGS`` or ``accelerate launch scripts/pretrain_text.py ARGS``.

Same options as ``xbt pretrain-text`` (see ``--help``); under ``accelerate launch`` the
caption encoding is split across the processes and training runs data-parallel.
"""

import logging
import sys

from xbt.errors import XBTError
from xbt.train.text_stage import run

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("xbt").setLevel(logging.INFO)
    try:
        sys.exit(run(sys.argv[1:]))
    except XBTError as error:
        print(f"pretrain_text: error: {error}", file=sys.stderr)
        sys.exit(2)
