"""``GET /healthz``, ``GET /metrics`` (Prometheus) and ``GET /v1/models``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from microlora.server.auth import Caller, Served

router = APIRouter()


@router.get("/healthz")
async def healthz(service: Served) -> dict:
    """Liveness, for anyone (no key): nothing about the store's tenants, not even how many."""
    return {"status": "ok", "base_model": service.composer.base.name,
            "batcher_alive": service.batcher.alive}


@router.get("/metrics")
async def metrics(service: Served) -> Response:
    for status, n in service.jobs.counts().items():
        service.metrics.jobs.labels(status).set(n)
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(key: Caller, service: Served) -> dict:
    return {"object": "list", "data": [{"id": service.composer.base.name, "object": "model",
                                        "owned_by": "microlora", "created": 0}]}
