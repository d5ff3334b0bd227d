"""`python -m peftfx.tools.cli ...`: the same as the `peftfx` console script."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
