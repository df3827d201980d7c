"""``microlora doctor``: load the default models once and report what a user needs to know."""

from __future__ import annotations

import time

import click

from microlora.commands.options import base_dtype_option, model_options
from microlora.core.paths import dir_bytes


@click.command()
@model_options
@base_dtype_option(from_store=False)
def doctor(base_model: str | None, embedder: str | None, device: str | None,
           base_dtype: str | None) -> None:
    """Load the base model and the embedder, and print their fingerprints, sizes and load times.

    The first run converts the packaged GGUF base model to safetensors under the cache
    directory (about a minute, once); later runs load it in about a second.
    """
    import torch

    from microlora.core.config import StoreConfig, TargetSpec, TrainConfig
    from microlora.core.embedder import load_embedder
    from microlora.core.kernel import MultiLoraModel
    from microlora.core.models import default_model_dir, load_base_model
    from microlora.core.runtime import bf16_is_fast
    from store.record import adapter_bytes

    if base_model is None and not default_model_dir().exists():
        click.echo("Converting the packaged Gemma 3 270M GGUF to safetensors (once, ~1 min)...")
    t0 = time.perf_counter()
    base = load_base_model(base_model, device=device, dtype=base_dtype)
    t_base = time.perf_counter() - t0
    t0 = time.perf_counter()
    emb = load_embedder(embedder, device=device)
    t_emb = time.perf_counter() - t0

    spec = TargetSpec()
    lora = MultiLoraModel(base.model, spec)
    shapes = lora.shapes()
    lora.remove()
    per_rank = sum(i + o for i, o in shapes.values())
    click.echo(f"torch {torch.__version__}, device {base.device}, dtype {base.dtype}"
               + (f", decoder linears {base.quantization}" if base.quantization else "")
               + ("; bf16 matmuls fast here (--base-dtype auto holds the base in bf16)"
                  if bf16_is_fast(base.device) else
                  "; bf16 matmuls slow here (--base-dtype auto holds the base in fp32)"))
    click.echo(f"base model  {base.name}: {base.num_parameters / 1e6:.1f}M parameters, "
               f"{base.weight_bytes / 2**20:.0f} MiB in memory, "
               f"{dir_bytes(base.path) / 2**20:.0f} MiB on disk at {base.path}")
    click.echo(f"            fingerprint {base.fingerprint}, loaded in {t_base:.1f} s")
    click.echo(f"embedder    {emb.name}: {emb.dim}-d, fingerprint {emb.fingerprint}, "
               f"loaded in {t_emb:.1f} s")
    rank = TrainConfig.rank
    stored = adapter_bytes(per_rank * rank, 2 * rank * len(shapes), StoreConfig.adapter_dtype)
    click.echo(f"default targets: {', '.join(spec.modules)} of the last {spec.last_layers} "
               f"layers = {len(shapes)} linears; a rank-{rank} adapter is {stored / 1024:.0f} KiB "
               f"stored as {StoreConfig.adapter_dtype}")
    probe = emb.encode(["microlora is ready."])
    click.echo(f"ok: embedder gives a unit vector (norm {float((probe ** 2).sum()) ** 0.5:.3f})")
