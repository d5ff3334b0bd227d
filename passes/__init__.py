"""Rewrite passes, one per file, each a table of `Rule`s (see peftfx.rewrite)."""
