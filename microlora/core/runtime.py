"""Process-wide settings of the libraries beneath torch that microlora's workloads need.

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
