"""`python -m peftfx.tools.bench [flags]`: the side-by-side benchmark (see the package docstring)."""

from . import main

if __name__ == "__main__":
    main()
