"""Background compile jobs for ``POST /v1/documents``: one worker thread, one job at a time,
each job in the store before it is acknowledged.

The worker trains on its own copy of the base model (made on the first job), so compiling
never touches the model that is answering requests; both share the one open store (LMDB
serialises the writes, and each batch of atoms lands in one transaction).

Jobs outlive the process (``store/jobs.py``): ``submit`` writes a job's record, its documents
and its plan (each document's atom ids) before it returns, so before the 202, and a job's
record is rewritten as it ends. A new ``CompileJobs`` on the store resumes the queued and
running jobs the last process left, oldest first (the atoms they stored already are not
trained again), and reports as ``interrupted`` any it cannot. ``close`` returns within
``stop_wait`` seconds: queued jobs stay stored for the next start, and the running one writes
no further batch.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, fields

from compiler.documents import Document
from compiler.pipeline import Plan, Quota, compile_documents, plan
from microlora.core.config import ChunkConfig, TrainConfig
from microlora.core.embedder import Embedder
from microlora.core.models import BaseModel
from microlora.server.errors import api_error
from store import AdapterStore

log = logging.getLogger(__name__)
ACTIVE = ("queued", "running")
STATUSES = (*ACTIVE, "done", "failed", "cancelled", "interrupted")
NOT_RESUMED = ("interrupted by a server restart and not resumed: this server plans the "
               "documents differently (another base model or recipe); upload them again")


@dataclass
class Job:
    id: str
    namespace: str
    documents: list[str]
    status: str = "queued"  # queued -> running -> done | failed | cancelled | interrupted
    atoms_done: int = 0
    atoms_total: int = 0
    trained: int = 0
    already_compiled: int = 0
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    resumed: bool = False  # queued again by a server that restarted
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
                "finished": None if self.finished is None else int(self.finished),
                "resumed": self.resumed}

    def record(self) -> dict:
        """What the store keeps of it (its documents' text and plan go in the body)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in _RECORDED}

    @classmethod
    def from_record(cls, namespace: str, job_id: str, record: dict) -> Job:
        job = cls(job_id, namespace, **{k: v for k, v in record.items() if k in _RECORDED})
        if job.finished is not None:
            job.ended.set()
        return job


_RECORDED = ("documents", "status", "atoms_done", "atoms_total", "trained", "already_compiled",
             "error", "created", "finished", "resumed")


class JobCancelled(Exception):
    """A job's namespace was deleted while it was queued or running."""


class Stopping(Exception):
    """The server is stopping: the job stays stored, to resume on the next start."""


class TooManyJobs(Exception):
    """A namespace has as many queued and running jobs as it may."""


class CompileJobs:
    """Queue of compile jobs and their progress, by id. Each namespace may have at most
    ``max_active`` jobs queued or running; only the newest ``keep_finished`` ended jobs are
    kept (older ones are answered as unknown). Opening resumes the jobs ``store`` holds."""

    def __init__(self, store: AdapterStore, base: BaseModel, embedder: Embedder, *,
                 model_lock: threading.Lock, train_config: TrainConfig = TrainConfig(),
                 chunk_config: ChunkConfig = ChunkConfig(), max_active: int = 4,
                 keep_finished: int = 1000, stop_wait: float = 5.0):
        self.store, self.embedder = store, embedder
        self.max_active, self.keep_finished, self.stop_wait = max_active, keep_finished, \
            stop_wait
        self.train_config, self.chunk_config = train_config, chunk_config
        self._base, self._model_lock = base, model_lock
        self._own_base: BaseModel | None = None
        self._jobs: dict[str, Job] = {}
        self._lock = threading.RLock()  # the jobs: starts, cancels, submits and pruning
        self._queue: queue.Queue[tuple[Job, list[Document], Quota] | None] = queue.Queue()
        self._stopping = threading.Event()
        self._restore()
        self._thread = threading.Thread(target=self._run, name="microlora-compile",
                                        daemon=True)
        self._thread.start()

    def submit(self, namespace: str, docs: list[Document], quota: Quota,
               prepared: Plan | None = None) -> Job:
        """Store and queue a compile (TooManyJobs if the namespace has ``max_active``
        already); ``prepared``: the documents' plan when the caller has made it (the route
        does, to check the quota), so the job does not chunk them again. The job is in the
        store when this returns."""
        if prepared is None:
            prepared = self._plan(docs)
        job = Job(f"job-{uuid.uuid4().hex[:16]}", namespace, [d.source for d in docs],
                  plan=prepared)
        body = {"documents": [d.to_json() for d in docs],
                "quota": {"max_atoms": quota.max_atoms, "max_bytes": quota.max_bytes},
                "manifests": prepared.manifests}
        with self._lock:
            if len(self._active(namespace)) >= self.max_active:
                raise TooManyJobs(namespace)
            self.store.put_job(namespace, job.id, job.record(), body)
            self._jobs[job.id] = job
        self._queue.put((job, docs, quota))
        return job

    def pending_atoms(self, namespace: str) -> list:
        """The planned atoms of the namespace's queued and running jobs (what a quota must
        count besides the stored ones)."""
        with self._lock:
            return [a for job in self._active(namespace) if job.plan for a in job.plan.atoms]

    def _active(self, namespace: str) -> list[Job]:
        return [j for j in self._jobs.values()
                if j.namespace == namespace and j.status in ACTIVE]

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
        running one before its next batch is written; the store forgets both now, so neither
        resumes after a restart."""
        n = 0
        with self._lock:
            for job in list(self._jobs.values()):
                if job.namespace == namespace and job.status in ACTIVE:
                    job.cancelled.set()
                    n += 1
                    if job.status == "queued":
                        self._end(job, "cancelled")
                    else:
                        self.store.end_job(namespace, job.id, None)
        return n

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for job in list(self._jobs.values()):
            out[job.status] += 1
        return out

    def stop(self) -> None:
        """Begin stopping, without waiting: no job starts, and the running one writes no
        further batch (it stops before the next, or inside the transaction of the one it is
        writing, which then writes nothing). Unfinished jobs resume on the next start."""
        self._stopping.set()
        self._queue.put(None)  # wakes an idle worker

    def close(self) -> None:
        """``stop``, and return once the worker has stopped, or after ``stop_wait`` seconds
        (a batch still training then is abandoned: nothing of it is written)."""
        self.stop()
        self._thread.join(self.stop_wait)
        if self._thread.is_alive():
            log.warning("compile jobs: a batch was still training after %g s; it is not "
                        "written, and its job resumes on the next start", self.stop_wait)

    # -- the worker --------------------------------------------------------------------------

    def _run(self) -> None:
        while (item := self._queue.get()) is not None and not self._stopping.is_set():
            job, docs, quota = item
            with self._lock:
                if job.cancelled.is_set():
                    continue  # ended when it was cancelled
                job.status = "running"

            def progress(done: int, total: int, job: Job = job) -> None:
                job.atoms_done, job.atoms_total = done, total

            def check(job: Job = job) -> None:
                if self._stopping.is_set():
                    raise Stopping(job.id)
                job.check()

            try:
                report = compile_documents(docs, self.store, base=self._training_base(),
                                           embedder=self.embedder, namespace=job.namespace,
                                           train_config=self.train_config,
                                           chunk_config=self.chunk_config, quota=quota,
                                           progress=progress, prepared=job.plan, check=check)
            except Exception as e:  # noqa: BLE001 - reported through GET /v1/jobs/{id}
                if job.cancelled.is_set():  # its namespace went, whatever failed on the way
                    self._end(job, "cancelled")
                elif self._stopping.is_set():
                    return  # whatever failed (the store closed under it): it resumes
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
        """End a job, in memory and in the store (a cancelled one is deleted there: it goes
        with its namespace), and prune the oldest ended jobs."""
        job.status, job.finished, job.plan = status, time.time(), None
        if status == "cancelled":
            job.error = "cancelled: the namespace was deleted"
        try:
            self.store.end_job(job.namespace, job.id,
                               None if status == "cancelled" else job.record())
        except Exception:  # noqa: BLE001 - the store closed as the server stopped
            log.exception("compile job %s ended (%s), but the store could not record it; it "
                          "runs again on the next start", job.id, status)
        job.ended.set()
        self._prune()

    def _prune(self) -> None:
        """Forget the oldest ended jobs past ``keep_finished``, here and in the store."""
        with self._lock:
            ended = sorted((j for j in self._jobs.values() if j.finished is not None),
                           key=lambda j: j.finished)
            for old in ended[:max(0, len(ended) - self.keep_finished)]:
                del self._jobs[old.id]
                self.store.end_job(old.namespace, old.id, None)

    def _restore(self) -> None:
        """Take up the jobs the store holds: ended ones are answered again, queued and
        running ones (the last process stopped or died first) are queued again, oldest first,
        or ended as ``interrupted`` when they cannot be (documents that no longer plan to the
        atoms they were accepted with)."""
        for namespace, job_id, record in sorted(self.store.jobs(),
                                                key=lambda j: j[2].get("created", 0)):
            job = Job.from_record(namespace, job_id, record)
            self._jobs[job.id] = job
            if job.status not in ACTIVE:
                continue
            resumed = self._resumable(job)
            if resumed is None:
                job.error = NOT_RESUMED
                self._end(job, "interrupted")
                continue
            docs, quota, job.plan = resumed
            job.status, job.resumed, job.atoms_done = "queued", True, 0
            self._queue.put((job, docs, quota))
            log.info("compile job %s (%s) resumed", job.id, namespace)
        self._prune()

    def _resumable(self, job: Job) -> tuple[list[Document], Quota, Plan] | None:
        """The job's documents, quota and plan, if they plan today as when it was accepted."""
        body = self.store.job_body(job.namespace, job.id)
        try:
            docs = [Document.from_json(d) for d in body["documents"]]
            quota = Quota(**body["quota"])
            planned = self._plan(docs)
        except (KeyError, TypeError, ValueError):
            return None
        if planned.problems or planned.manifests != body["manifests"]:
            return None
        return docs, quota, planned

    def _plan(self, docs: list[Document]) -> Plan:
        base = self._base
        return plan(docs, base.tokenizer, base.fingerprint, self.train_config,
                    self.chunk_config)

    def _training_base(self) -> BaseModel:
        """A private copy of the base model, taken while no request is using the shared one
        (its adapter wrappers are idle then)."""
        if self._own_base is None:
            with self._model_lock:
                self._own_base = copy.deepcopy(self._base)
        return self._own_base
