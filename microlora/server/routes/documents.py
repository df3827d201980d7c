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
from microlora.core.errors import (
    QuotaExceededError,
    UnknownDocumentError,
    UnknownNamespaceError,
)
from microlora.core.provenance import cite
from microlora.server.auth import Caller, Served
from microlora.server.errors import ApiError, not_found
from microlora.server.jobs import TooManyJobs
from microlora.server.keys import KeyRecord
from microlora.server.schemas import MAX_DOCUMENTS, DocumentsRequest
from microlora.server.service import Service

router = APIRouter()


def _json_schema() -> dict:
    """``DocumentsRequest``'s JSON schema with its one model inlined (the route reads its body
    itself, so FastAPI does not list the models under components)."""
    schema = DocumentsRequest.model_json_schema(ref_template="{model}")
    defs = schema.pop("$defs")
    schema["properties"]["documents"]["items"] = defs["DocumentIn"]
    return schema


_UPLOAD = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _json_schema()},
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
    # chunked here, once (on a worker thread, off the event loop), and the plan goes to the
    # job with the documents
    planned = plan(docs, base.tokenizer, base.fingerprint, config, service.config.chunk)
    if planned.problems:
        raise ApiError(400, "; ".join(f"document {p.source}: {p.reason}"
                                      for p in planned.problems))
    try:  # the atoms of the caller's queued jobs count too
        check_quota(service.store, key.namespace,
                    planned.atoms + service.jobs.pending_atoms(key.namespace), base, config,
                    quota)
        job = service.jobs.submit(key.namespace, docs, quota, planned)
    except QuotaExceededError as e:
        raise ApiError(429, str(e), "quota_exceeded", "quota_exceeded") from None
    except TooManyJobs:
        raise ApiError(429, f"{service.jobs.max_active} of your compile jobs are queued or "
                            "running already; send more when one has ended (GET /v1/jobs/ID)",
                       "rate_limit_error", "too_many_jobs") from None
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
                        "page": r.page or None, "section": list(r.section),
                        "citation": cite(r.source, r.page, r.section),
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
    service.jobs.cancel(key.namespace)  # first: a running job must not bring it back
    try:
        n = service.store.drop(key.namespace)
    except UnknownNamespaceError:
        n = 0
    return {"namespace": key.namespace, "deleted": True, "atoms_deleted": n}
