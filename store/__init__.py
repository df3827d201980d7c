"""The adapter store: LMDB records (adapters, text, embeddings, provenance) per namespace, a
FAISS index per namespace, and checksums to catch corruption. No models, no training."""

from store.adapter_store import (
    FORMAT_VERSION,
    AdapterStore,
    StoreHeader,
    validate_namespace,
)
from store.index import VectorIndex
from store.layout import StoreLayout, is_store
from store.maintenance import NamespaceStats, VerifyReport
from store.reader import Reader
from store.record import AtomRecord

__all__ = ["FORMAT_VERSION", "AdapterStore", "AtomRecord", "NamespaceStats", "Reader",
           "StoreHeader", "StoreLayout", "VectorIndex", "VerifyReport", "is_store",
           "validate_namespace"]
