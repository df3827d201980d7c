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
