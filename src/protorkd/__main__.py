"""`python -m protorkd ...` is the same as the `protorkd` command (and what torchrun launches)."""

import sys

from protorkd.cli import main

if __name__ == "__main__":
    sys.exit(main())
