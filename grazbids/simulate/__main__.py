"""``python -m grazbids.simulate``: the same command as ``grazbids-simulate``."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
