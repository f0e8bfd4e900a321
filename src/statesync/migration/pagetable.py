"""Moved: the page table is statesync.stream.store.PageStore (re-exported until callers switch)."""
from statesync.stream.store import PageStore as PageTable  # noqa: F401
