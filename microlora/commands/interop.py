"""``microlora export`` and ``microlora import``: composed adapters out to PEFT's LoRA format,
and PEFT LoRAs in as atoms."""

from __future__ import annotations

from pathlib import Path

import click

from microlora.commands.options import base_dtype_option, model_options, store_option
from microlora.core.config import AskConfig


@click.command("export")
@click.argument("out_dir", type=click.Path(path_type=Path, file_okay=False))
@store_option(help="The store holding the atoms.")
@click.option("--atoms", "--atom", "atoms", multiple=True, metavar="ID",
              help="Atom ids to compose (repeat); see `microlora ask --explain`.")
@click.option("--query", help="Compose the atoms this question retrieves instead.")
@click.option("--namespace", "-n", "namespaces", multiple=True,
              help="Namespaces to look in [default: all for --atoms, every shared one for "
                   "--query].")
@click.option("-k", "k", default=AskConfig.k, show_default=True, type=click.IntRange(1),
              help="Atoms to retrieve with --query.")
@model_options
@base_dtype_option()
def export_command(out_dir: Path, store_dir: Path, atoms, query, namespaces, k, base_model,
                   embedder, device, base_dtype) -> None:
    """Write the composition of some atoms as a standard PEFT LoRA in OUT_DIR.

    OUT_DIR gets adapter_config.json and adapter_model.safetensors (PEFT's key names and
    shapes; rank = the atoms' ranks summed), loadable by peft.PeftModel.from_pretrained, vLLM,
    LoRAX or TGI on the same base model.

    \b
    Examples:
      microlora export out/ --store ~/kb --query "Who founded Brightwater Clockworks?"
      microlora export out/ --store ~/kb --atoms 3f2a... --atoms 9c41...
    """
    from composer import Composer
    from composer.export import export_peft, hits_for_atoms
    from microlora.core.config import AskConfig

    if bool(atoms) == bool(query):
        raise click.UsageError("give --atoms ID... or --query TEXT (one of them)")
    with Composer.open(store_dir, base_model=base_model, embedder=embedder,
                       device=device, base_dtype=base_dtype) as composer:
        hits = hits_for_atoms(composer.store, atoms, namespaces) if atoms else \
            composer.retrieve([query], namespaces or None, AskConfig(k=k))[0]
        out = export_peft(composer, hits, out_dir)
    for h in hits:
        click.echo(f"{h.namespace}/{h.id}" + (f"  score {h.score:.3f}" if query else ""),
                   err=True)
    click.echo(f"wrote a PEFT LoRA of {len(hits)} atoms to {out}")


@click.command("import")
@click.argument("peft_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@store_option(help="The store to add the adapter to (its base model must match).")
@click.option("--namespace", "-n", default="default", show_default=True,
              help="Namespace to add the atom to.")
@click.option("--text", required=True,
              help="What the adapter knows, in words: retrieval matches questions to it.")
@model_options
def import_command(peft_dir: Path, store_dir: Path, namespace: str, text: str, base_model,
                   embedder, device) -> None:
    """Add the PEFT LoRA in PEFT_DIR to a store as one atom.

    The adapter must be for the store's base model: every module it adapts must exist there
    with the same shape. Its scale (lora_alpha / r) is folded into the stored weights.

    \b
    Example:
      microlora import ./my-lora --store ~/kb -n imported --text "Velmora's currency facts"
    """
    from compiler.peft_import import import_peft
    from microlora.core.embedder import load_embedder
    from microlora.core.models import load_base_model
    from store import AdapterStore, validate_namespace

    validate_namespace(namespace)
    base = load_base_model(base_model, device=device)
    emb = load_embedder(embedder, device=device)
    with AdapterStore(store_dir) as store:
        record = import_peft(peft_dir, store, base=base, embedder=emb, namespace=namespace,
                             text=text)
    click.echo(f"imported {peft_dir} as atom {record.id} (rank {record.config['rank']}, "
               f"{len(record.adapter.modules)} modules) into {store_dir} [{namespace}]")
