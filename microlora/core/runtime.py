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

import ctypes
import mmap
import os
import sys
from pathlib import Path

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


_MADV_DONTNEED = 4  # Linux's value


def release_file_pages(address: int, nbytes: int) -> bool:
    """Drop this process's resident pages of ``[address, address + nbytes)`` when the range
    lies in a private mapping of a file: a tensor of a memory-mapped checkpoint, converted
    to another dtype and no longer used. transformers maps the whole checkpoint, so those pages
    stay resident until every tensor of the file is gone; for Gemma 3 270M's fp32 vocabulary
    that is 671 MB (``core.models.hold_vocabulary_in_bf16``). Reading the range again would
    fault the file's bytes back in, so this changes no value that a live tensor sees; memory
    that is not a file's (an anonymous copy, already freed and perhaps reused) is left alone.
    Linux only; returns whether pages were dropped."""
    page = mmap.PAGESIZE
    start, end = -(-address // page) * page, (address + nbytes) // page * page
    if not sys.platform.startswith("linux") or end <= start:
        return False
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return False
    for line in maps:  # "lo-hi perms offset dev inode [path]"
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= start and end <= hi:
            file_backed = len(fields) == 6 and fields[5].startswith("/") and fields[4] != "0"
            if not (file_backed and fields[1].endswith("p")):
                return False
            libc = ctypes.CDLL(None, use_errno=True)
            return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                                _MADV_DONTNEED) == 0
    return False
