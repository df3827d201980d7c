"""``microlora store ls|docs|stats|verify|rm|compact``: inspect and maintain an adapter store."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from microlora.commands.options import store_option
from microlora.core.config import ADAPTER_DTYPES
from microlora.core.paths import dir_bytes

store_option = store_option(help="The store directory (made by `microlora compile --store DIR`).")


def _open(store_dir: Path, readonly: bool = True):
    from store import AdapterStore

    return AdapterStore(store_dir, readonly=readonly)


@click.group()
def store() -> None:
    """Inspect and maintain an adapter store (LMDB + FAISS)."""


@store.command("ls")
@store_option
def ls(store_dir: Path) -> None:
    """List the namespaces in a store and how many atoms each holds."""
    with _open(store_dir) as s:
        names = s.namespaces()
        if not names:
            click.echo("(no namespaces)")
        for ns in names:
            click.echo(f"{ns}\t{s.count(ns)} atoms")


@store.command()
@store_option
@click.argument("namespace")
def docs(store_dir: Path, namespace: str) -> None:
    """List the documents of NAMESPACE and how many atoms each produced: the ids that
    `store rm --document` takes (a file's path relative to the directory compiled)."""
    with _open(store_dir) as s:
        documents = s.documents(namespace)
    if not documents:
        click.echo("(no documents)")
    for doc_id, ids in sorted(documents.items()):
        click.echo(f"{doc_id}\t{len(ids)} atoms")


@store.command()
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def stats(store_dir: Path, as_json: bool) -> None:
    """Atoms, bytes per atom and index kind per namespace, and what the store is for."""
    with _open(store_dir) as s:
        rows = s.stats()
        disk = dir_bytes(store_dir)
        if as_json:
            click.echo(json.dumps({"header": asdict(s.header), "disk_bytes": disk, "namespaces": [
                {**asdict(r), "bytes_per_atom": r.bytes_per_atom} for r in rows]}, indent=2))
            return
        h = s.header
        click.echo(f"store {store_dir} (format v{h.format_version}), {disk / 2**20:.1f} MiB "
                   "on disk")
        click.echo(f"base model {h.base_name} ({h.base_fingerprint[:12]}, "
                   f"{h.base_dtype or 'fp32 or bf16'}), embedder {h.embedder_name} "
                   f"({h.embedding_dim}-d)")
        click.echo(f"{'namespace':<24}{'atoms':>10}{'KiB/atom':>12}  index")
        for r in rows:
            click.echo(f"{r.namespace:<24}{r.atoms:>10}{r.bytes_per_atom / 1024:>12.1f}  "
                       f"{r.index}")


@store.command()
@store_option
@click.option("--namespace", "-n", multiple=True, help="Only these namespaces [default: all].")
@click.option("--base-model", type=click.Path(exists=True, file_okay=False),
              help="Also check that the store was compiled for this base model folder.")
def verify(store_dir: Path, namespace: tuple[str, ...], base_model: str | None) -> None:
    """Recompute every atom's checksum and name the atoms that are corrupt (exit code 1).

    With --base-model, also fail unless the store's adapters belong to that model.
    """
    with _open(store_dir) as s:
        if base_model is not None:
            from microlora.core.models import load_base_model

            base = load_base_model(base_model, device="cpu")
            s.check_compatible(base.fingerprint, base_name=base.name)
            click.echo(f"ok: the store belongs to base model {base.name} "
                       f"({base.fingerprint[:12]})")
        report = s.verify(list(namespace) or None)
    for ns, atom_id, why in report.bad:
        click.echo(f"BAD {ns}/{atom_id}: {why}")
    for ns, why in report.damaged:
        click.echo(f"DAMAGED {ns}: {why}")
    if report.damaged:
        raise click.ClickException(f"{len(report.damaged)} namespace(s) have damaged LMDB "
                                   "pages: restore the store from a backup, or re-compile "
                                   "into a new store")
    if not report.ok:
        raise click.ClickException(f"{len(report.bad)} of {report.checked} atoms are corrupt; "
                                   "delete them with `microlora store rm` and re-compile")
    click.echo(f"ok: {report.checked} atoms verified")


@store.command()
@store_option
@click.argument("namespace")
@click.option("--atom", "atoms", multiple=True, help="Delete only these atom ids.")
@click.option("--document", "documents", multiple=True,
              help="Forget only this document (its path relative to the directory compiled, "
                   "or the id it was uploaded with; `store docs` lists them): its atoms that "
                   "no other document of the namespace shares.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def rm(store_dir: Path, namespace: str, atoms: tuple[str, ...], documents: tuple[str, ...],
       yes: bool) -> None:
    """Delete a whole NAMESPACE, or only the atoms or documents given."""
    if atoms and documents:
        raise click.UsageError("give --atom or --document, not both")
    with _open(store_dir, readonly=False) as s:
        count = s.count(namespace)  # fails clearly on an unknown namespace
        known = s.documents(namespace) if documents else {}
        for doc in documents:  # all checked before anything is deleted
            if doc not in known:
                like = [k for k in known if doc.endswith("/" + k) or k.endswith("/" + doc)]
                raise click.ClickException(
                    f"namespace {namespace!r} has no document {doc!r}" +
                    (f" (did you mean {', '.join(map(repr, like))}?)" if like else "") +
                    f"; `microlora store docs {namespace}` lists them")
        what = (f"{len(atoms)} atom(s) from {namespace!r}" if atoms else
                f"{len(documents)} document(s) from {namespace!r}" if documents else
                f"namespace {namespace!r} with {count} atoms")
        if not yes:
            click.confirm(f"Delete {what}?", abort=True)
        if documents:
            for doc in documents:
                click.echo(f"forgot {doc} ({s.delete_document(namespace, doc)} atoms)")
        elif atoms:
            n = s.delete(namespace, atoms)
            click.echo(f"deleted {n} of {len(atoms)} atoms from {namespace!r}")
        else:
            click.echo(f"dropped namespace {namespace!r} ({s.drop(namespace)} atoms)")
    click.echo("(their bytes stay in the store's free pages until `microlora store compact`)",
               err=True)


@store.command()
@store_option
@click.option("--adapter-dtype", type=click.Choice(ADAPTER_DTYPES),
              help="First rewrite every atom's adapter in this storage (e.g. int8: half the "
                   "bytes of bf16), keeping its id, text and embedding.")
def compact(store_dir: Path, adapter_dtype: str | None) -> None:
    """Rewrite the store with only what it holds now, so deleted atoms, documents and
    namespaces leave nothing on disk (LMDB keeps freed pages until later writes reuse them).

    Needs the store to itself: stop a server or compile that has it open first.
    """
    with _open(store_dir, readonly=False) as s:
        if adapter_dtype is not None:
            click.echo(f"re-encoded {s.reencode(adapter_dtype)} atoms as {adapter_dtype}")
        before, after = s.compact()
    click.echo(f"compacted {store_dir}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
