"""Process-wide settings of the libraries beneath torch that microlora's workloads need, and
what the hardware computes fastest.

oneDNN, which runs torch's bf16 matmuls on the CPU, compiles a kernel for each new matmul
shape and keeps the last 1,024 by default. A compile meets new shapes at every batch (rows of
every length, atoms finishing at different steps), so that cache grew by about 5 MB an atom
until it was full: about 1 GB of a long compile's peak memory. With 32 kernels kept, compiling
took as long as before and trained the same adapters (measured in benchmarks/RESULTS.md,
"Compile memory"). A server meets new shapes too (batch sizes, prompt lengths), so the cap
holds for every command.
"""

from __future__ import annotations

import os

import torch

ONEDNN_CACHE_ENVS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")
ONEDNN_CACHE_CAPACITY = 32


def bound_kernel_cache(capacity: int = ONEDNN_CACHE_CAPACITY) -> bool:
    """Cap oneDNN's kernel cache at ``capacity`` unless the environment already sets it.

    oneDNN reads the setting once, when it compiles its first kernel, so this must run before
    the process's first bf16 matmul: ``load_base_model`` calls it. Returns whether it set it.
    """
    if any(name in os.environ for name in ONEDNN_CACHE_ENVS):
        return False
    os.environ[ONEDNN_CACHE_ENVS[0]] = str(capacity)
    return True


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 matmuls outrun fp32 ones on ``device``: on CUDA (tensor cores) and on CPUs
    with AMX. Elsewhere torch's bf16 matmuls are the slower: 129 against 243 GFLOP/s on 2
    AVX-512 cores without AMX, a 153-atom compile 300 s in bf16 against 220 s in fp32
    (benchmarks/RESULTS.md, "Compile: fp32 where bf16 is slow"); with AMX, bf16 was the faster
    (350-390 GFLOP/s)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch's own CPU probe
        return bool(amx is not None and amx())
    return False
