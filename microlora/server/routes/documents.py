"""A user's own knowledge: ``/v1/documents`` (compile, list, forget), ``/v1/jobs/ID``,
``/v1/atoms/ID`` and ``DELETE /v1/namespace``."""

from __future__ import annotations

import hashlib

from fastapi import APIRouter

from compiler.documents import Document
from compiler.pipeline import Quota, check_quota, plan
from composer.retrieval import default_namespaces
from microlora.core.errors import (
    QuotaExceededError,
    UnknownDocumentError,
    UnknownNamespaceError,
)
from microlora.server.auth import Caller, Served
from microlora.server.errors import ApiError, not_found
from microlora.server.schemas import DocumentsRequest

router = APIRouter()


@router.post("/v1/documents", status_code=202)
def add_documents(body: DocumentsRequest, key: Caller, service: Served) -> dict:
    docs = [Document(d.id or "doc-" + hashlib.sha256(d.text.encode()).hexdigest()[:16],
                     d.text, d.title) for d in body.documents]
    if len({d.source for d in docs}) != len(docs):
        raise ApiError(400, "document ids must be unique within a request")
    quota = Quota(key.max_atoms, key.max_bytes)
    base = service.composer.base
    config = service.config.train
    # chunked here, once (a sync route: FastAPI runs it on a worker thread, off the event
    # loop), and the plan goes to the job with the documents
    planned = plan(docs, base.tokenizer, base.fingerprint, config, service.config.chunk)
    if planned.problems:
        raise ApiError(400, "; ".join(f"document {p.source}: {p.reason}"
                                      for p in planned.problems))
    try:
        check_quota(service.store, key.namespace, planned.atoms, base, config, quota)
    except QuotaExceededError as e:
        raise ApiError(429, str(e), "quota_exceeded", "quota_exceeded") from None
    job = service.jobs.submit(key.namespace, docs, quota, planned)
    return {"job": job.public()}


@router.get("/v1/documents")
def list_documents(key: Caller, service: Served) -> dict:
    try:
        docs = service.store.documents(key.namespace) \
            if key.namespace in service.store.namespaces() else {}
    except UnknownNamespaceError:  # dropped since it was listed
        docs = {}
    return {"object": "list", "data": [{"id": d, "atoms": len(a)} for d, a in docs.items()]}


@router.get("/v1/jobs/{job_id}")
def job(job_id: str, key: Caller, service: Served) -> dict:
    found = service.jobs.get(job_id)
    if found is None or found.namespace != key.namespace:
        raise not_found("job", job_id)
    return found.public()


@router.get("/v1/atoms/{atom_id}")
def atom(atom_id: str, key: Caller, service: Served) -> dict:
    """An atom of a namespace this key reads; any other is "not found", and only readable
    namespaces are looked in (so neither the answer nor its time depends on other tenants)."""
    store = service.store
    if not 0 < len(atom_id.encode()) <= 256:  # no stored id is longer
        raise not_found("atom", atom_id)
    present = store.namespaces()
    readable = ([key.namespace] if key.namespace in present else []) + \
        key.readable_shared(default_namespaces(store))
    for ns in readable:
        try:
            with store.read(ns) as reader:
                if atom_id not in reader:
                    continue
                r = reader.get(atom_id, copy=False)
                return {"id": atom_id, "object": "microlora.atom", "namespace": ns,
                        "text": r.text, "source": r.source, "start": r.start, "end": r.end,
                        "modules": len(r.adapter.modules), "rank": r.adapter.rank}
        except UnknownNamespaceError:
            continue  # dropped since it was listed
    raise not_found("atom", atom_id)


@router.delete("/v1/documents/{doc_id:path}")
def delete_document(doc_id: str, key: Caller, service: Served) -> dict:
    """Forget one of the caller's documents; only the caller's namespace is looked in."""
    if len(doc_id.encode()) > 256:  # no stored id is longer
        raise not_found("document", doc_id)
    try:
        n = service.store.delete_document(key.namespace, doc_id)
    except (UnknownNamespaceError, UnknownDocumentError):
        raise not_found("document", doc_id) from None
    return {"id": doc_id, "deleted": True, "atoms_deleted": n}


@router.delete("/v1/namespace")
def delete_namespace(key: Caller, service: Served) -> dict:
    try:
        n = service.store.drop(key.namespace)
    except UnknownNamespaceError:
        n = 0
    return {"namespace": key.namespace, "deleted": True, "atoms_deleted": n}
