"""Settings beneath torch: oneDNN's kernel cache is capped unless the user set it, and a FAISS
search runs on one thread without taking torch's threads away."""

import faiss

from microlora.core import runtime


def test_the_kernel_cache_is_capped_unless_the_environment_says_otherwise(monkeypatch):
    for name in runtime.ONEDNN_CACHE_ENVS:
        monkeypatch.delenv(name, raising=False)
    assert runtime.bound_kernel_cache() is True
    assert runtime.os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == \
        str(runtime.ONEDNN_CACHE_CAPACITY)
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    monkeypatch.setenv("DNNL_PRIMITIVE_CACHE_CAPACITY", "256")  # the user's, by its old name
    assert runtime.bound_kernel_cache() is False
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in runtime.os.environ


def test_a_search_runs_faiss_on_one_thread_and_leaves_torchs_threads_alone(monkeypatch):
    import numpy as np
    import torch

    from store.index import VectorIndex

    seen = []
    index = VectorIndex.build(np.eye(4, dtype=np.float32), list("abcd"), 0)
    real = index.index.search
    monkeypatch.setattr(index.index, "search",
                        lambda *a: seen.append(faiss.omp_get_max_threads()) or real(*a))
    threads = torch.get_num_threads()
    assert index.search(np.eye(4, dtype=np.float32)[2], 1)[0][0][0] == "c"
    assert seen == [1] and torch.get_num_threads() == threads  # one OpenMP runtime for both


def _resident_kb(address: int) -> int:
    """Resident kB of the mapping that holds ``address`` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        first = line.split(maxsplit=1)[0]
        if "-" in first and ":" not in first:
            lo, hi = (int(x, 16) for x in first.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1])
    raise AssertionError("no mapping holds the address")


def test_released_file_pages_leave_residency_and_read_back_the_same(tmp_path):
    """A private mapping of a file (how transformers maps a checkpoint) gives its pages back
    and reads the file's bytes again afterwards; anonymous memory is never touched."""
    import ctypes
    import mmap
    import sys

    import pytest
    import torch

    if not sys.platform.startswith("linux"):
        pytest.skip("pages are released on Linux only")
    data = torch.arange(2 << 20, dtype=torch.int32)  # 8 MiB
    path = tmp_path / "weights.bin"
    path.write_bytes(data.numpy().tobytes())
    with open(path, "r+b") as f:
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
    view = torch.frombuffer(mapped, dtype=torch.int32)
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
    assert int(view.sum()) == int(data.sum())  # every page read: resident
    before = _resident_kb(address)
    assert before >= 8 << 10
    assert runtime.release_file_pages(address, view.numel() * 4) is True
    assert _resident_kb(address) <= before - (8 << 10) + 4  # all but a partial page
    assert torch.equal(view, data)  # faulted back in from the file: the same values
    anonymous = torch.arange(1 << 20, dtype=torch.int32)
    assert runtime.release_file_pages(anonymous.data_ptr(), anonymous.numel() * 4) is False
    assert torch.equal(anonymous, torch.arange(1 << 20, dtype=torch.int32))
    del view
