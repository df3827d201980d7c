"""`microlora serve` killed with SIGKILL (a real process, tiny random models) while it
compiles an upload and while it forgets a document; started again on the same store. Every
document must then be whole with its manifest, or gone, the store must verify clean, and the
interrupted job must resume. (The same for `microlora compile`:
tests/test_compile.py::test_sigkill_mid_compile_leaves_a_clean_store_that_resumes.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from click.testing import CliRunner

from microlora.cli import cli
from microlora.server.keys import KeyStore
from store import AdapterStore

ANA = "user:ana"


def sentences(first: int, n: int) -> str:
    """n distinct 8-word sentences of the tiny vocabulary (one atom each), from ``first``."""
    return " ".join(" ".join(f"w{(5 * i + 17 * j) % 127}" for j in range(8)) + "."
                    for i in range(first, first + n))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(store: Path, tiny_models) -> Iterator[tuple[subprocess.Popen, str]]:
    """`microlora serve` on ``store`` in a process of its own: (the process, its URL) once it
    answers; killed on the way out if it still runs."""
    lm, emb = tiny_models
    port = free_port()
    log_path = store.parent / "serve.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "microlora", "serve", "--store",
                                 str(store), "--port", str(port), "--base-model", str(lm),
                                 "--embedder", str(emb)], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        until(lambda: _answers(url), proc, log_path)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def until(condition: Callable[[], object], proc: subprocess.Popen, log: Path,
          timeout: float = 600) -> object:
    """Poll ``condition`` until it holds (a condition, not a timing: the deadline only ends a
    hung test), failing with the server's log if the server exits first."""
    deadline = time.monotonic() + timeout
    while not (got := condition()):
        assert proc.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)
    return got


def job_now(url: str, token: str, job: str) -> dict | None:
    """The job as the server reports it, on a connection of its own (None if the server did
    not answer: a loaded server may drop an idle keep-alive connection as it is reused)."""
    try:
        return httpx.get(f"{url}/v1/jobs/{job}", headers={"Authorization": token},
                         timeout=60).json()
    except httpx.TransportError:
        return None


def kill_9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def as_ana(url: str, store: Path) -> httpx.Client:
    token = KeyStore(store).add("ana")[0] if not KeyStore(store).list() else None
    client = httpx.Client(base_url=url, timeout=60)
    if token:
        client.headers["Authorization"] = f"Bearer {token}"
    return client


def check_store(store: Path) -> tuple[set[str], dict[str, list[str]]]:
    """The stored atom ids and manifests of ana's namespace, after checking that every stored
    atom is in a manifest (so whatever was stored can be forgotten by its document) and that
    `microlora store verify` finds the store clean."""
    done = CliRunner().invoke(cli, ["store", "verify", "--store", str(store)])
    assert done.exit_code == 0 and "ok:" in done.output, done.output
    with AdapterStore(store, readonly=True) as s:
        if ANA not in s.namespaces():
            return set(), {}
        stored, manifests = set(s.ids(ANA)), s.documents(ANA)
    assert stored <= {i for ids in manifests.values() for i in ids}
    return stored, manifests


def test_kill_9_during_an_upload_job_then_the_restart_resumes_it(tmp_path, tiny_models):
    store = tmp_path / "kb"
    docs = [{"id": f"d{k}", "text": sentences(24 * k, 24)} for k in range(4)]  # 3 batches
    with serving(store, tiny_models) as (proc, url), as_ana(url, store) as c:
        token = c.headers["Authorization"]
        r = c.post("/v1/documents", json={"documents": docs})
        assert r.status_code == 202, r.text
        job = r.json()["job"]["id"]
        until(lambda: (job_now(url, token, job) or {}).get("atoms_done"), proc,
              tmp_path / "serve.log")  # its first batch is stored
        kill_9(proc)
    stored, manifests = check_store(store)
    assert 0 < len(stored) < 96, "the job ended before the server was killed"
    assert all(stored & set(ids) for ids in manifests.values())  # a manifest: a stored atom

    with serving(store, tiny_models) as (proc, url), httpx.Client(
            base_url=url, headers={"Authorization": token}, timeout=60) as c:
        ended = until(lambda: (j := job_now(url, token, job)) and j["status"] not in
                      ("queued", "running") and j, proc, tmp_path / "serve.log")
        assert ended["status"] == "done" and ended["resumed"], ended
        assert ended["already_compiled"] == len(stored)
        listed = {d["id"]: d["atoms"] for d in c.get("/v1/documents").json()["data"]}
        assert listed == {f"d{k}": 24 for k in range(4)}
        kill_9(proc)
    stored, manifests = check_store(store)
    assert len(stored) == 96 and all(set(ids) <= stored for ids in manifests.values())


def test_kill_9_during_a_document_delete_leaves_each_document_whole_or_gone(tmp_path,
                                                                           tiny_models):
    store = tmp_path / "kb"
    docs = {"a": sentences(0, 6), "b": sentences(3, 6), "c": sentences(20, 4)}  # a, b share 3
    with serving(store, tiny_models) as (proc, url), as_ana(url, store) as c:
        token = c.headers["Authorization"]
        r = c.post("/v1/documents", json={"documents": [{"id": d, "text": t}
                                                          for d, t in docs.items()]})
        job = r.json()["job"]["id"]
        until(lambda: (job_now(url, token, job) or {}).get("status") == "done", proc,
              tmp_path / "serve.log")
        assert c.delete("/v1/documents/a").json()["atoms_deleted"] == 3  # "b" keeps 3
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
            sock.sendall(f"DELETE /v1/documents/b HTTP/1.1\r\nHost: x\r\nAuthorization: "
                         f"{token}\r\n\r\n".encode())
            kill_9(proc)  # with the delete of "b" sent: done, under way or not begun
    stored, manifests = check_store(store)
    assert "a" not in manifests and set(manifests) in ({"b", "c"}, {"c"})
    assert stored == {i for ids in manifests.values() for i in ids}  # each whole or gone

    with serving(store, tiny_models) as (proc, url), httpx.Client(
            base_url=url, headers={"Authorization": token}, timeout=60) as c:
        listed = {d["id"]: d["atoms"] for d in c.get("/v1/documents").json()["data"]}
        assert listed == {d: len(ids) for d, ids in manifests.items()}
        if "b" in listed:  # not forgotten before the kill: it can be now
            assert c.delete("/v1/documents/b").json()["atoms_deleted"] == 6
        assert [d["id"] for d in c.get("/v1/documents").json()["data"]] == ["c"]
        kill_9(proc)
    stored, manifests = check_store(store)
    assert list(manifests) == ["c"] and stored == set(manifests["c"])
