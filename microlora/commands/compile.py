"""``microlora compile``: documents -> atoms -> adapters in a store."""

from __future__ import annotations

from pathlib import Path

import click

from compiler.documents import MAX_FILE_MB
from microlora.commands.options import (
    adapter_dtype_option,
    base_dtype_option,
    model_options,
    recipe_options,
    store_option,
)
from microlora.core.provenance import cite


@click.command("compile")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@store_option(help="Store directory (created if it does not exist).")
@click.option("--namespace", "-n", default="default", show_default=True,
              help="Namespace to compile into: a corpus name, or user:NAME.")
@model_options
@base_dtype_option()
@recipe_options
@adapter_dtype_option
@click.option("--max-file-mb", default=MAX_FILE_MB, show_default=True, type=float,
              help="Skip files larger than this.")
@click.option("--prune", is_flag=True,
              help="Delete atoms of the namespace that these documents no longer produce.")
@click.option("--dry-run", is_flag=True, help="List the atoms to train and estimate the time.")
def compile_command(paths, store_dir, namespace, base_model, embedder, device, base_dtype,
                    recipe, store_config, max_file_mb, prune, dry_run) -> None:
    """Compile documents into tiny LoRA adapters, one per sentence-sized atom.

    PATHS are files or directories of .txt, .md and .jsonl (a "text" field per line, optional
    "id" and "title"), and of .pdf, .html, .docx, .pptx and .epub with the docs extra
    (pip install 'microlora[docs]'): each atom records its page and section. Atoms already
    in the store are skipped, so re-running after an edit trains only the changed
    sentences, and an interrupted compile resumes where it stopped.

    Under torchrun (`torchrun --nproc-per-node N -m microlora compile ...`) the atoms are
    shared out between the N processes (or machines) and merged into the store at the end,
    with the same adapters as one process would train.

    \b
    Examples:
      microlora compile notes/ --store ~/kb --namespace notes
      microlora compile report.pdf site.html notes.docx --store ~/kb
      torchrun --nproc-per-node 4 -m microlora compile notes/ --store ~/kb
    """
    from tqdm import tqdm

    from compiler.distributed import Ranks, compile_distributed
    from compiler.pipeline import compile_corpus
    from microlora.core.embedder import load_embedder
    from microlora.core.models import load_base_model
    from store import stored_base_dtype, validate_namespace

    validate_namespace(namespace)
    config, chunking = recipe
    ranks = Ranks.from_env()
    if ranks is not None and dry_run:
        raise click.UsageError("--dry-run plans in one process: run it without torchrun")
    if ranks is not None:
        device = ranks.device(device)
    base = load_base_model(base_model, device=device,
                           dtype=base_dtype or stored_base_dtype(store_dir))
    emb = load_embedder(embedder, device=device)
    bar = tqdm(total=0, unit="atom", disable=dry_run or (ranks is not None and ranks.rank != 0),
               desc="compiling" if ranks is None else f"compiling (rank 0 of {ranks.world})")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        if ranks is None:
            report = compile_corpus(paths, store_dir, base=base, embedder=emb,
                                    namespace=namespace, train_config=config,
                                    chunk_config=chunking, prune=prune, dry_run=dry_run,
                                    max_file_mb=max_file_mb, progress=progress,
                                    store_config=store_config)
        else:
            report = compile_distributed(paths, store_dir, ranks, base=base, embedder=emb,
                                         namespace=namespace, train_config=config,
                                         chunk_config=chunking, prune=prune,
                                         max_file_mb=max_file_mb, progress=progress,
                                         store_config=store_config)
    finally:
        bar.close()
    if report is None:
        return  # not rank 0: rank 0 reports for the run
    for problem in report.problems:
        click.echo(f"skipped {problem.source}: {problem.reason}", err=True)
    if dry_run:
        for p in report.planned:
            a = p.atom
            click.echo(f"{p.id[:12]}  {cite(a.source, a.page, a.section, a.start, a.end)}  "
                       f"{a.text[:90]!r}")
        click.echo(f"{report.documents} documents, {report.atoms} atoms: "
                   f"{report.already_compiled} already compiled, {len(report.planned)} to train "
                   f"(about {report.estimated_seconds / 60:.1f} min on {base.device.type})")
        return
    if report.documents == 0:
        raise click.ClickException("nothing to compile: no readable documents in " +
                                   ", ".join(map(str, paths)))
    trained = (f"{report.trained} trained ({report.atoms_per_s:.2f} atoms/s, mean final loss "
               f"{report.mean_final_loss:.3f})" if report.trained else "nothing to train")
    click.echo(f"{report.documents} documents, {report.atoms} atoms: {trained}, "
               f"{report.already_compiled} already compiled"
               + (f", {report.pruned} pruned" if prune else "") + f" -> {store_dir} [{namespace}]")
