"""``python -m grazbids``: the same command as ``grazbids``."""
import sys

from .cli.run import main

if __name__ == "__main__":
    sys.exit(main())
