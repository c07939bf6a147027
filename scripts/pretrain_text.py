"""Stage 1 as a script: ``python scripts/pretrain_text.py ARGS`` or ``accelerate launch scripts/pretrain_text.py ARGS``.

Same options as ``xbt pretrain-text`` (see ``--help``); under ``accelerate launch`` the
caption encoding is split across the processes and training runs data-parallel.
"""

import sys

from xbt.train.commands import pretrain_text, script_main

if __name__ == "__main__":
    sys.exit(script_main("pretrain_text", pretrain_text))
