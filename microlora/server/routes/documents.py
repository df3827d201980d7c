"""A user's own knowledge: ``/v1/documents`` (compile, list, forget), ``/v1/jobs/ID``,
``/v1/atoms/ID`` and ``DELETE /v1/namespace``."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from compiler.documents import SUPPORTED, Document, Skipped, read_file_bytes
from compiler.pipeline import Quota, check_quota, plan
from composer.retrieval import default_namespaces
from microlora.core.errors import QuotaExceededError, UnknownNamespaceError
from microlora.core.provenance import cite
from microlora.server.auth import Caller, Served
from microlora.server.errors import ApiError
from microlora.server.keys import KeyRecord
from microlora.server.schemas import MAX_DOCUMENTS, DocumentsRequest
from microlora.server.service import Service

router = APIRouter()

_UPLOAD = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["documents"], "properties": {
        "documents": {"type": "array", "items": {"type": "object", "properties": {
            "text": {"type": "string"}, "id": {"type": "string"},
            "title": {"type": "string"}}, "required": ["text"]}}}}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                 "description": f"files of type {', '.join(SUPPORTED)}"}}}},
}}}


@router.post("/v1/documents", status_code=202, openapi_extra=_UPLOAD)
async def add_documents(request: Request, key: Caller, service: Served) -> dict:
    """Compile documents into the caller's namespace, in the background (a job): JSON
    (``{"documents": [{"text", "id", "title"}]}``) or files (multipart/form-data, one or
    more ``file`` fields: the same types as ``microlora compile``; each file's name is its
    document id)."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        docs = await _uploaded(request)
    elif kind.startswith("application/x-www-form-urlencoded"):
        raise ApiError(400, "send documents as JSON, or files as multipart/form-data")
    else:
        docs = _json_documents(await request.body())
    return await run_in_threadpool(_submit, docs, key, service)


def _json_documents(body: bytes) -> list[Document]:
    try:
        request = DocumentsRequest.model_validate_json(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None
    return [Document(d.id or "doc-" + hashlib.sha256(d.text.encode()).hexdigest()[:16],
                     d.text, d.title) for d in request.documents]


async def _uploaded(request: Request) -> list[Document]:
    """The documents in the uploaded files, read as ``microlora compile`` reads files."""
    docs: list[Document] = []
    problems: list[Skipped] = []
    async with request.form(max_files=MAX_DOCUMENTS, max_fields=MAX_DOCUMENTS) as form:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise ApiError(400, 'no files: send each document as a "file" field of '
                                "multipart/form-data")
        for upload in files:
            name = Path(upload.filename or "").name.strip()  # its name, never a path
            if not name or len(name) > 200:
                raise ApiError(400, "every file needs a name of 1 to 200 characters (its type "
                                    "is read from it)")
            got, bad = await run_in_threadpool(read_file_bytes, name, await upload.read())
            docs += got
            problems += bad
    if problems:
        raise ApiError(400, "; ".join(f"document {p.source}: {p.reason}" for p in problems))
    return docs


def _submit(docs: list[Document], key: KeyRecord, service: Service) -> dict:
    """Plan the documents (refusing any that give no atom, or that would take the caller
    past its quota) and queue their compile job."""
    if len({d.source for d in docs}) != len(docs):
        raise ApiError(400, "document ids must be unique within a request")
    quota = Quota(key.max_atoms, key.max_bytes)
    base = service.composer.base
    config = service.config.train
    planned, problems, _ = plan(docs, base.tokenizer, base.fingerprint, config,
                                service.config.chunk)
    if problems:
        raise ApiError(400, "; ".join(f"document {p.source}: {p.reason}" for p in problems))
    try:
        check_quota(service.store, key.namespace, planned, base, config, quota)
    except QuotaExceededError as e:
        raise ApiError(429, str(e), "quota_exceeded", "quota_exceeded") from None
    job = service.jobs.submit(key.namespace, docs, quota)
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
                    "page": r.page or None, "section": list(r.section),
                    "citation": cite(r.source, r.page, r.section),
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
