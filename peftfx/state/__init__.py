"""Adapter state: the store of adapter tensors, slot banks, the variant graphs built over them, and the
one owner of which graph runs now (model_state.ModelState)."""

from .store import AdapterStore
from .variants import BASE_ROW, MIXED_VARIANT_LIMIT, VariantCache, VariantSpec

__all__ = ["AdapterStore", "BASE_ROW", "MIXED_VARIANT_LIMIT", "VariantCache", "VariantSpec"]
