"""torch.fx's source cache: the generated code of graphs peftfx drops is released with them.

Every `GraphModule.recompile()` (and every codegen of peftfx/bindings.py) stores the generated source in
torch.fx's process-wide `_loader.eval_cache` and registers it in `linecache`, under a fresh key
`<eval_with_key>.N`, so that tracebacks can show it. Nothing ever removes those entries: a process that
builds and drops graphs (adapters added and deleted, mixed batches of many adapter sets) grows without
bound. peftfx records the keys made while it builds a graph and releases them when the graph is dropped.

Keys are told apart by their number: `made_since(n)` is every key numbered n or above. Graphs built at the
same time by another thread would be counted in, which only costs them their traceback source lines.
"""

from __future__ import annotations

import contextlib
import linecache
import re
from typing import Iterator

from torch.fx.graph_module import _loader

_KEY = re.compile(r"<eval_with_key>\.(\d+)")


def next_key() -> int:
    """The number the next generated source will get."""
    return _loader.next_id


def made_since(start: int) -> list[str]:
    """Cache keys of the sources generated since `next_key()` returned `start`."""
    end = _loader.next_id
    if end == start:
        return []
    keys = []
    for key in _loader.eval_cache:
        match = _KEY.match(key)
        if match is not None and start <= int(match.group(1)) < end:
            keys.append(key)
    return keys


def release(keys: list[str]) -> None:
    """Forget these generated sources (the code objects live on while a function uses them)."""
    for key in keys:
        _loader.eval_cache.pop(key, None)
        linecache.cache.pop(key, None)


@contextlib.contextmanager
def scratch_code() -> Iterator[None]:
    """Release, on leaving the block, the source of every graph generated inside it (scratch graphs
    that are read and thrown away, such as the module an adapter plan is made from)."""
    start = next_key()
    try:
        yield
    finally:
        release(made_since(start))


def cached_source_count() -> int:
    """How many generated sources torch.fx holds now (for leak checks)."""
    return len(_loader.eval_cache)
