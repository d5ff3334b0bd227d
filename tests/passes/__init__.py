"""Per-pass tests (one file per pass in peftfx.state.variants.PIPELINE). A package, so its module names
never clash with tests/test_*.py of the same name."""
