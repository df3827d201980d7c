"""The adapter store: LMDB records (adapters, text, embeddings, provenance) per namespace, a
FAISS index per namespace, and checksums to catch corruption. No models, no training."""

from store.adapter_store import AdapterStore, stored_base_dtype, validate_namespace
from store.documents import MAX_DOCUMENT_ID_BYTES, BatchDocuments, check_document_id
from store.header import FORMAT_VERSION, StoreHeader
from store.index import VectorIndex
from store.layout import StoreLayout, is_store
from store.maintenance import NamespaceStats, VerifyReport
from store.reader import Reader
from store.record import AtomRecord

__all__ = ["FORMAT_VERSION", "MAX_DOCUMENT_ID_BYTES", "AdapterStore",
           "AtomRecord", "BatchDocuments", "NamespaceStats", "Reader", "StoreHeader",
           "StoreLayout", "VectorIndex", "VerifyReport", "check_document_id", "is_store",
           "stored_base_dtype", "validate_namespace"]
