"""Reading a store's files into the page cache before its questions need them.

A question reads its atoms from LMDB's memory map and the lists it probes from the index's; a
page that is not in the page cache is a disk read, and at a million atoms the slowest
questions of a store opened cold wait on the disk (benchmarks/RESULTS.md, "Scale"). Where a
server opens a store (``StoreConfig.background_verify``), its background thread reads each
namespace's index into memory (``IndexCache.hold_index_in_memory``), then LMDB's file through,
in order, if it fits in half the memory the system has available: one sequential pass, which
the disk serves far faster than the same pages one question at a time.
``posix_fadvise(WILLNEED)`` would ask the kernel to do it without the copy, but Linux reads
only a few MB of a large file ahead on that advice (measured: 8 MB of 2 GB), so the pages are
read here, in chunks, the GIL released by each read.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

CHUNK = 8 << 20  # bytes per read: large enough for the disk, small enough to stop promptly
SHARE = 0.5  # of the memory available: files larger than this are left to be read on demand


def fits(paths: Sequence[Path], share: float = SHARE) -> bool:
    """Whether the files at ``paths`` together take at most ``share`` of available memory."""
    size = sum(p.stat().st_size for p in paths if p.exists())
    return size <= share * psutil.virtual_memory().available


def read_through(paths: Sequence[Path], stop: threading.Event | None = None) -> int:
    """Read the files at ``paths`` through once, so their pages are in the page cache; returns
    the bytes read (less if ``stop`` was set on the way). A file that is missing or cannot
    be read is skipped: this only warms what a read would fetch anyway."""
    buffer = memoryview(bytearray(CHUNK))
    done = 0
    for path in paths:
        try:
            with open(path, "rb", buffering=0) as f:
                if hasattr(os, "posix_fadvise"):  # the kernel reads further ahead
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                while (n := f.readinto(buffer)):
                    done += n
                    if stop is not None and stop.is_set():
                        return done
        except OSError as e:
            log.debug("not read into the page cache: %s (%s)", path, e)
    return done
