"""Batch embedding as a script: `python scripts/embed.py ...` or `accelerate launch scripts/embed.py ...`.

Takes the same flags as `xbt embed`, or one YAML/JSON config file.
"""

import sys

from xbt.embed import main

if __name__ == "__main__":
    sys.exit(main())
