"""Process-wide settings beneath torch: oneDNN's kernel cache is capped unless the user set
it, and FAISS searches on one thread beside torch."""

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


def test_faiss_searches_on_one_thread_once_the_store_is_imported():
    import store.index  # noqa: F401

    assert faiss.omp_get_max_threads() == 1
