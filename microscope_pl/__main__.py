"""`python -m microscope_pl` is the same as the `microscope` console script."""
import sys

from microscope_pl.cli import main

if __name__ == "__main__":
    sys.exit(main())
