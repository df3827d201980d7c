"""The server's compile jobs across restarts, on tiny models in this process: a job is in the
store before its 202, a stopping server leaves its queue there and returns at once, the next
server resumes it (or says why it cannot), and a deleted namespace takes its jobs along.
(tests/test_crash.py kills a real `microlora serve` instead.)"""

from __future__ import annotations

from dataclasses import replace

import httpx
import pytest
from conftest import sentences, store_of_random_atoms

from compiler.documents import Document
from compiler.pipeline import Quota
from composer import Composer
from microlora.core.config import ChunkConfig, TargetSpec, TrainConfig
from microlora.core.embedder import load_embedder
from microlora.core.models import load_base_model
from microlora.server.app import Service, serve_in_thread
from microlora.server.config import ServeConfig
from microlora.server.keys import KeyStore
from store import AdapterStore

RECIPE = TrainConfig(targets=TargetSpec(last_layers=2), max_steps=3, lr=2e-2, bf16=False,
                     batch_atoms=8, neighbours=1)
CHUNK = ChunkConfig(max_tokens=16, min_chars=10)
DOC_1 = "w1 w2 w3 w4 w5 w6 w7 w8. w9 w10 w11 w12 w13 w14 w15."
DOC_2 = "w20 w21 w22 w23 w24 w25. w30 w31 w32 w33 w34 w35."
ANA = "user:ana"


@pytest.fixture(scope="module")
def models(tiny_models):
    lm, emb_path = tiny_models
    return load_base_model(lm, dtype="fp32"), load_embedder(emb_path)


@pytest.fixture
def kb(models, tmp_path):
    """(store path, ana's key) of a fresh store."""
    base, emb = models
    path = store_of_random_atoms(tmp_path / "kb", base, emb, {"wiki": ["w90 w91 w92 w93"]})
    return path, KeyStore(path).add("ana")[0]


def start(models, path, **config) -> Service:
    """A server's state over the store at ``path``, as ``microlora serve`` opens it."""
    base, emb = models
    return Service(Composer(AdapterStore(path), base, emb),
                   ServeConfig(**{"train": RECIPE, "chunk": CHUNK, **config}))


def post(c: httpx.Client, docs: list[dict]) -> str:
    r = c.post("/v1/documents", json={"documents": docs})
    assert r.status_code == 202, r.text
    return r.json()["job"]["id"]


def stored_jobs(store: AdapterStore) -> dict[str, str]:
    return {job_id: record["status"] for _, job_id, record in store.jobs()}


def test_jobs_are_stored_before_the_202_and_resumed_after_a_restart(models, kb, paused):
    path, token = kb
    reached, go = paused(2)  # the first job's second batch
    service = start(models, path)
    with serve_in_thread(service) as url, httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        long = post(c, [{"id": "long", "text": sentences(0, 10)}])  # two batches of 5
        assert reached.wait(120)  # batch 1 stored, batch 2 trained and about to be
        queued = post(c, [{"id": "next", "text": DOC_2}])
        assert stored_jobs(service.store) == {long: "queued", queued: "queued"}
        assert service.store.job_body(ANA, queued)["documents"][0]["text"] == DOC_2
        service.jobs.stop()
        go.set()
    service.close()  # returns with a job running and one queued
    with AdapterStore(path, readonly=True) as s:  # batch 2 was not written, "next" not begun
        assert s.count(ANA) == 5 and list(s.documents(ANA)) == ["long"]
        assert stored_jobs(s) == {long: "queued", queued: "queued"}

    service = start(models, path)  # the restart
    try:
        resumed = service.jobs.wait(long, timeout=120)
        assert resumed.status == "done" and resumed.resumed
        assert (resumed.trained, resumed.already_compiled) == (5, 5)
        assert service.jobs.wait(queued, timeout=120).status == "done"
        docs = service.store.documents(ANA)
        assert set(docs) == {"long", "next"}
        assert set(service.store.ids(ANA)) == {i for ids in docs.values() for i in ids}
        assert stored_jobs(service.store) == {long: "done", queued: "done"}
        assert service.store.job_body(ANA, long) is None  # the documents' text went with it
        with serve_in_thread(service) as url:
            got = httpx.get(f"{url}/v1/jobs/{long}", headers={"Authorization": f"Bearer {token}"})
            assert got.json()["status"] == "done" and got.json()["resumed"] is True
    finally:
        service.close()


def test_close_returns_while_a_batch_trains_and_the_job_resumes_next_start(models, kb, paused):
    path, _ = kb
    reached, go = paused(1)
    service = start(models, path, stop_wait_s=0.1)
    job = service.jobs.submit(ANA, [Document("one", DOC_1)], Quota())
    assert reached.wait(120)
    service.close()  # the batch cannot end (the gate is shut): close gives up on it
    go.set()  # it ends now, into a closed store: nothing of it is written
    service = start(models, path)
    try:
        assert service.jobs.wait(job.id, timeout=120).status == "done"
        assert list(service.store.documents(ANA)) == ["one"]
        assert service.store.count(ANA) == 2
    finally:
        service.close()


def test_a_job_that_plans_differently_after_a_restart_is_reported_interrupted(models, kb,
                                                                               paused):
    path, _ = kb
    reached, go = paused(1)
    service = start(models, path, stop_wait_s=0.1)
    job = service.jobs.submit(ANA, [Document("one", DOC_1)], Quota())
    assert reached.wait(120)
    service.close()
    go.set()
    other = replace(RECIPE, max_steps=2)  # another recipe: other atom ids
    for _ in range(2):  # and reported so again by the restart after
        service = start(models, path, train=other)
        try:
            ended = service.jobs.wait(job.id, timeout=120)
            assert ended.status == "interrupted" and "upload them again" in ended.error
            assert ANA not in service.store.namespaces()
            assert service.jobs.counts()["interrupted"] == 1
        finally:
            service.close()


def test_deleting_the_namespace_deletes_its_stored_jobs(models, kb, paused):
    path, token = kb
    reached, go = paused(1)
    service = start(models, path)
    with serve_in_thread(service) as url, httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        done = post(c, [{"id": "one", "text": DOC_1}])
        assert reached.wait(120)
        go.set()
        assert service.jobs.wait(done, timeout=120).status == "done"
        reached, go = paused(2)
        running = post(c, [{"id": "long", "text": sentences(0, 10)}])
        assert reached.wait(120)
        queued = post(c, [{"id": "next", "text": DOC_2}])
        assert c.delete("/v1/namespace").status_code == 200
        assert stored_jobs(service.store) == {}  # none resumes, none names a document
        go.set()
        assert service.jobs.wait(running, timeout=120).status == "cancelled"
    service.close()
    service = start(models, path)
    try:
        assert [service.jobs.get(j) for j in (done, running, queued)] == [None] * 3
        assert ANA not in service.store.namespaces()
    finally:
        service.close()
