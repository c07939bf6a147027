"""Stage 2 (LoRA adapters + ψ) as a script: `python scripts/train_adapter.py ...` or `accelerate launch scripts/train_adapter.py ...`.

Takes the same flags as `xbt train`, or one YAML/JSON config file.
"""

import sys

from xbt.train.commands import script_main, train

if __name__ == "__main__":
    sys.exit(script_main("train_adapter", train))
