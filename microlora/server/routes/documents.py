"""A user's own knowledge: ``/v1/documents`` (compile, list, forget), ``/v1/jobs/ID``,
``/v1/atoms/ID`` and ``DELETE /v1/namespace``."""

from __future__ import annotations

import hashlib

from fastapi import APIRouter

from compiler.documents import Document
from compiler.pipeline import Quota, check_quota, plan
from composer.retrieval import default_namespaces
from microlora.core.errors import QuotaExceededError, UnknownNamespaceError
from microlora.server.auth import Caller, Served
from microlora.server.errors import ApiError
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
    docs = service.store.documents(key.namespace) \
        if key.namespace in service.store.namespaces() else {}
    return {"object": "list", "data": [{"id": d, "atoms": len(a)} for d, a in docs.items()]}


@router.get("/v1/jobs/{job_id}")
def job(job_id: str, key: Caller, service: Served) -> dict:
    found = service.jobs.get(job_id)
    if found is None:
        raise ApiError(404, f"no job {job_id!r}", code="job_not_found")
    if found.namespace != key.namespace:
        raise ApiError(403, "this job belongs to another user", "permission_error")
    return found.public()


@router.get("/v1/atoms/{atom_id}")
def atom(atom_id: str, key: Caller, service: Served) -> dict:
    shared = default_namespaces(service.store)
    others = []
    for ns in service.store.namespaces():
        with service.store.read(ns) as reader:
            if atom_id not in reader:
                continue
            if not key.can_read(ns, shared):
                others.append(ns)
                continue
            r = reader.get(atom_id, copy=False)
            return {"id": atom_id, "object": "microlora.atom", "namespace": ns,
                    "text": r.text, "source": r.source, "start": r.start, "end": r.end,
                    "modules": len(r.adapter.modules), "rank": r.adapter.rank}
    if others:
        raise ApiError(403, "this atom is not readable with this key", "permission_error")
    raise ApiError(404, f"no atom {atom_id!r}", code="atom_not_found")


@router.delete("/v1/documents/{doc_id:path}")
def delete_document(doc_id: str, key: Caller, service: Served) -> dict:
    store = service.store
    if key.namespace in store.namespaces() and doc_id in store.documents(key.namespace):
        n = store.delete_document(key.namespace, doc_id)
        return {"id": doc_id, "deleted": True, "atoms_deleted": n}
    if any(doc_id in store.documents(ns) for ns in store.namespaces() if ns != key.namespace):
        raise ApiError(403, "this document belongs to another namespace", "permission_error")
    raise ApiError(404, f"no document {doc_id!r} in {key.namespace}", code="document_not_found")


@router.delete("/v1/namespace")
def delete_namespace(key: Caller, service: Served) -> dict:
    try:
        n = service.store.drop(key.namespace)
    except UnknownNamespaceError:
        n = 0
    return {"namespace": key.namespace, "deleted": True, "atoms_deleted": n}
