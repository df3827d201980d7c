"""Background compile jobs for ``POST /v1/documents``: one worker thread, one job at a time.

The worker trains on its own copy of the base model (made on the first job), so compiling
never touches the model that is answering requests; both share the one open store (LMDB
serialises the writes, and each batch of atoms lands in one transaction).
"""

from __future__ import annotations

import copy
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from compiler.documents import Document
from compiler.pipeline import Plan, Quota, compile_documents
from microlora.core.config import ChunkConfig, TrainConfig
from microlora.core.embedder import Embedder
from microlora.core.models import BaseModel
from microlora.server.errors import api_error
from store import AdapterStore


@dataclass
class Job:
    id: str
    namespace: str
    documents: list[str]
    status: str = "queued"  # queued -> running -> done | failed | cancelled
    atoms_done: int = 0
    atoms_total: int = 0
    trained: int = 0
    already_compiled: int = 0
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    ended: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False,
                                       compare=False)
    plan: Plan | None = field(default=None, repr=False, compare=False)  # until it ends

    def check(self) -> None:
        """Stop the compile if the job was cancelled (run before each batch and inside the
        transaction that writes it)."""
        if self.cancelled.is_set():
            raise JobCancelled(self.id)

    def public(self) -> dict:
        return {"id": self.id, "object": "microlora.job", "status": self.status,
                "namespace": self.namespace, "documents": self.documents,
                "atoms_done": self.atoms_done, "atoms_total": self.atoms_total,
                "trained": self.trained, "already_compiled": self.already_compiled,
                "error": self.error, "created": int(self.created),
                "finished": None if self.finished is None else int(self.finished)}


class JobCancelled(Exception):
    """A job's namespace was deleted while it was queued or running."""


class TooManyJobs(Exception):
    """A namespace has as many queued and running jobs as it may."""


class CompileJobs:
    """Queue of compile jobs and their progress, by id. Each namespace may have at most
    ``max_active`` jobs queued or running; only the newest ``keep_finished`` ended jobs are
    kept (older ones are answered as unknown)."""

    def __init__(self, store: AdapterStore, base: BaseModel, embedder: Embedder, *,
                 model_lock: threading.Lock, train_config: TrainConfig = TrainConfig(),
                 chunk_config: ChunkConfig = ChunkConfig(),
                 on_done: Callable[[Job], None] | None = None, max_active: int = 4,
                 keep_finished: int = 1000):
        self.store, self.embedder, self.on_done = store, embedder, on_done
        self.max_active, self.keep_finished = max_active, keep_finished
        self.train_config, self.chunk_config = train_config, chunk_config
        self._base, self._model_lock = base, model_lock
        self._own_base: BaseModel | None = None
        self._jobs: dict[str, Job] = {}
        self._lock = threading.RLock()  # the jobs: starts, cancels, submits and pruning
        self._queue: queue.Queue[tuple[Job, list[Document], Quota, Plan | None] | None] = \
            queue.Queue()
        self._thread = threading.Thread(target=self._run, name="microlora-compile",
                                        daemon=True)
        self._thread.start()

    def submit(self, namespace: str, docs: list[Document], quota: Quota,
               prepared: Plan | None = None) -> Job:
        """Queue a compile (TooManyJobs if the namespace has ``max_active`` already);
        ``prepared``: the documents' plan when the caller has made it (the route does, to
        check the quota), so the job does not chunk them again."""
        job = Job(f"job-{uuid.uuid4().hex[:16]}", namespace, [d.source for d in docs],
                  plan=prepared)
        with self._lock:
            if len(self._active(namespace)) >= self.max_active:
                raise TooManyJobs(namespace)
            self._jobs[job.id] = job
        self._queue.put((job, docs, quota, prepared))
        return job

    def pending_atoms(self, namespace: str) -> list:
        """The planned atoms of the namespace's queued and running jobs (what a quota must
        count besides the stored ones)."""
        with self._lock:
            return [a for job in self._active(namespace) if job.plan for a in job.plan.atoms]

    def _active(self, namespace: str) -> list[Job]:
        return [j for j in self._jobs.values()
                if j.namespace == namespace and j.status in ("queued", "running")]

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """The job once it has ended (done or failed); TimeoutError if it has not by then."""
        job = self._jobs[job_id]
        if not job.ended.wait(timeout):
            raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")
        return job

    def cancel(self, namespace: str) -> int:
        """Cancel every queued or running job of ``namespace`` (before the namespace is
        deleted: a job never brings it back); returns how many. A queued job ends at once, a
        running one before its next batch is written."""
        n = 0
        with self._lock:
            for job in list(self._jobs.values()):
                if job.namespace == namespace and job.status in ("queued", "running"):
                    job.cancelled.set()
                    n += 1
                    if job.status == "queued":
                        self._end(job, "cancelled")
        return n

    def counts(self) -> dict[str, int]:
        out = {"queued": 0, "running": 0, "done": 0, "failed": 0, "cancelled": 0}
        for job in list(self._jobs.values()):
            out[job.status] += 1
        return out

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            job, docs, quota, prepared = item
            with self._lock:
                if job.cancelled.is_set():
                    continue  # ended when it was cancelled
                job.status = "running"

            def progress(done: int, total: int, job: Job = job) -> None:
                job.atoms_done, job.atoms_total = done, total

            try:
                report = compile_documents(docs, self.store, base=self._training_base(),
                                           embedder=self.embedder, namespace=job.namespace,
                                           train_config=self.train_config,
                                           chunk_config=self.chunk_config, quota=quota,
                                           progress=progress, prepared=prepared,
                                           check=job.check)
            except Exception as e:  # noqa: BLE001 - reported through GET /v1/jobs/{id}
                if job.cancelled.is_set():  # its namespace went, whatever failed on the way
                    self._end(job, "cancelled")
                else:
                    job.error = api_error(e).detail  # in API terms
                    self._end(job, "failed")
                continue
            job.trained, job.already_compiled = report.trained, report.already_compiled
            job.atoms_total = job.atoms_done = report.trained
            if report.problems and not report.atoms:
                job.error = "; ".join(f"{p.source}: {p.reason}" for p in report.problems)
                self._end(job, "failed")
            else:
                self._end(job, "done")

    def _end(self, job: Job, status: str) -> None:
        job.status, job.finished, job.plan = status, time.time(), None
        if status == "cancelled":
            job.error = "cancelled: the namespace was deleted"
        job.ended.set()
        with self._lock:  # prune the oldest ended jobs
            ended = sorted((j for j in self._jobs.values() if j.finished is not None),
                           key=lambda j: j.finished)
            for old in ended[:max(0, len(ended) - self.keep_finished)]:
                del self._jobs[old.id]
        if self.on_done:
            self.on_done(job)

    def _training_base(self) -> BaseModel:
        """A private copy of the base model, taken while no request is using the shared one
        (its adapter wrappers are idle then)."""
        if self._own_base is None:
            with self._model_lock:
                self._own_base = copy.deepcopy(self._base)
        return self._own_base
