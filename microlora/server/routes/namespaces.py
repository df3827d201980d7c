"""``GET /v1/namespaces``: what this key may search, so that a client (the web page) can offer
the shared corpora to choose among. Only the caller's own namespace and the shared corpora it
was granted are listed: never another user's, nor a corpus the key may not read."""

from __future__ import annotations

from fastapi import APIRouter

from composer.retrieval import default_namespaces
from microlora.core.errors import UnknownNamespaceError
from microlora.server.auth import Caller, Served
from store import AdapterStore

router = APIRouter()


@router.get("/v1/namespaces")
def namespaces(key: Caller, service: Served) -> dict:
    """The caller's namespace (``kind: own``, listed with 0 atoms before its first upload)
    and each shared corpus the key reads (``kind: shared``), with their atom counts. A
    request's ``namespaces`` field chooses among the shared ones; the own one is always
    searched."""
    store = service.store
    present = set(store.namespaces())
    own = {"id": key.namespace, "object": "microlora.namespace", "kind": "own",
           "atoms": _count(store, key.namespace, present) or 0}
    shared = [{"id": ns, "object": "microlora.namespace", "kind": "shared", "atoms": n}
              for ns in key.readable_shared(default_namespaces(store))
              if (n := _count(store, ns, present)) is not None]
    return {"object": "list", "user": key.user, "data": [own, *shared]}


def _count(store: AdapterStore, namespace: str, present: set[str]) -> int | None:
    """Its atoms; None when it does not exist (the caller's own before its first upload, or a
    corpus dropped since it was listed)."""
    if namespace not in present:
        return None
    try:
        return store.count(namespace)
    except UnknownNamespaceError:
        return None
