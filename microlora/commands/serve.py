"""``microlora serve`` and ``microlora keys``: the HTTP server and its API keys."""

from __future__ import annotations

from pathlib import Path

import click

from microlora.commands.options import base_dtype_option, model_options, store_option
from microlora.core.config import AskConfig
from microlora.server.config import ServeConfig

_SERVE = ServeConfig()


@click.command("serve")
@store_option(help="The store to serve (created if it does not exist).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (0.0.0.0 for every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("-k", "k", default=_SERVE.ask.k, show_default=True, type=click.IntRange(1, 16),
              help="Atoms composed per answer unless a request sets \"k\".")
@click.option("--max-new-tokens", default=_SERVE.ask.max_new_tokens, show_default=True,
              type=click.IntRange(1, 256),
              help="Longest answer unless a request sets max_tokens.")
@click.option("--max-batch", default=_SERVE.max_batch, show_default=True,
              type=click.IntRange(1, 256),
              help="Most requests decoded together in one batch.")
@click.option("--max-prompt-tokens", default=_SERVE.max_prompt_tokens, show_default=True,
              type=click.IntRange(1),
              help="Longest question a request may ask, in base-model tokens (longer: 400).")
@click.option("--max-upload-mb", default=_SERVE.max_upload_bytes / 2**20, show_default=True,
              type=click.FloatRange(0, min_open=True),
              help="Largest upload of files to POST /v1/documents, in MiB (other "
                   f"bodies: {_SERVE.max_body_bytes / 2**20:g} MiB).")
@click.option("--max-namespaces", default=_SERVE.max_namespaces, show_default=True,
              type=click.IntRange(1),
              help="Most namespaces the store may hold (one per user with documents; deleted "
                   "ones count until `microlora store compact`).")
@model_options
@base_dtype_option()
def serve_command(store_dir: Path, host: str, port: int, k: int, max_new_tokens: int,
                  max_batch: int, max_prompt_tokens: int, max_upload_mb: float,
                  max_namespaces: int, base_model, embedder, device, base_dtype) -> None:
    """Serve a store over an OpenAI-compatible HTTP API.

    Requests need an API key (create one with `microlora keys add`). Each key is one user:
    it compiles documents into its own namespace user:NAME (POST /v1/documents) and its
    questions search that namespace plus the shared corpora it was granted. Concurrent
    requests are decoded together, each with its own composed atoms.

    \b
    Endpoints:
      POST /v1/chat/completions, /v1/completions   (stream: true for SSE; extra fields
                                                    k, mode, namespaces)
      POST /v1/documents   (JSON, or files as multipart/form-data: .pdf, .html,
                            .docx, ... with the docs extra)
      GET /v1/documents   DELETE /v1/documents/ID
      GET /v1/jobs/ID   GET /v1/atoms/ID   DELETE /v1/namespace
      GET /v1/models   GET /healthz   GET /metrics (Prometheus)

    \b
    Example:
      microlora keys add ana --store ~/kb        # prints the key once
      microlora serve --store ~/kb --port 8000
      curl localhost:8000/v1/chat/completions -H "Authorization: Bearer $KEY" \\
        -H 'Content-Type: application/json' \\
        -d '{"model": "microlora", "messages": [{"role": "user", "content": "Who ...?"}]}'
    """
    import uvicorn

    from microlora.server.app import create_app, open_service

    config = ServeConfig(max_batch=max_batch, max_prompt_tokens=max_prompt_tokens,
                         max_upload_bytes=int(max_upload_mb * 2**20),
                         max_namespaces=max_namespaces,
                         ask=AskConfig(k=k, max_new_tokens=max_new_tokens))
    service = open_service(store_dir, base_model=base_model, embedder=embedder, device=device,
                           base_dtype=base_dtype, config=config)
    try:
        click.echo(f"serving {store_dir} ({service.composer.base.name}) on "
                   f"http://{host}:{port}  - keys: {len(service.keys.list())}", err=True)
        uvicorn.run(create_app(service), host=host, port=port, log_level="warning")
    finally:
        service.close()


@click.group()
def keys() -> None:
    """Create, list and revoke the API keys of a served store."""


_keys_store = store_option(help="The store the keys are for.")


@keys.command("add")
@click.argument("user")
@_keys_store
@click.option("--grant", "grants", multiple=True, metavar="NAMESPACE",
              help="A shared namespace of the store this key may read (it must exist); "
                   "repeat for several [default: every shared namespace, present and future].")
@click.option("--max-atoms", default=10_000, show_default=True, type=click.IntRange(1),
              help="Quota: most atoms in the user's namespace.")
@click.option("--max-mb", default=100.0, show_default=True, type=click.FloatRange(0.01),
              help="Quota: most MiB the user's namespace may take.")
def add(user: str, store_dir: Path, grants: tuple[str, ...], max_atoms: int,
        max_mb: float) -> None:
    """Create a key for USER (their namespace is user:USER); the key is printed once."""
    from composer.retrieval import default_namespaces
    from microlora.server.keys import ALL_SHARED, KeyStore
    from store import AdapterStore

    _require_store(store_dir)
    with AdapterStore(store_dir, readonly=True) as store:
        shared = default_namespaces(store)
    plaintext, record = KeyStore(store_dir).add(user, grants or (ALL_SHARED,),
                                                max_atoms=max_atoms,
                                                max_bytes=int(max_mb * 2**20), shared=shared)
    click.echo(plaintext)
    click.echo(f"key {record.id} for {record.namespace}, reads "
               f"{', '.join(record.grants)}; store it now, it is not shown again", err=True)


@keys.command("ls")
@_keys_store
def ls(store_dir: Path) -> None:
    """List keys: id, user, grants and quotas (never the keys themselves)."""
    from microlora.server.keys import KeyStore

    records = KeyStore(store_dir).list()
    if not records:
        click.echo("(no keys)")
    for r in records:
        click.echo(f"{r.id}\t{r.namespace}\treads {','.join(r.grants)}\t"
                   f"max {r.max_atoms} atoms, {(r.max_bytes or 0) / 2**20:g} MiB")


@keys.command("revoke")
@click.argument("key_id")
@_keys_store
def revoke(key_id: str, store_dir: Path) -> None:
    """Revoke the key KEY_ID (as `keys ls` shows it); a running server refuses it at once."""
    from microlora.server.keys import KeyStore

    record = KeyStore(store_dir).revoke(key_id)
    click.echo(f"revoked {record.id} ({record.namespace})")


def _require_store(store_dir: Path) -> None:
    from store import is_store

    if not is_store(store_dir):
        raise click.ClickException(f"{store_dir} is not a store yet; compile documents into it "
                                   "or start `microlora serve --store` on it first")
