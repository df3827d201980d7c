"""The background checksum pass (``store/background_verify.py``): it checks every atom so that
reads hash none, reports a corrupt one as a read would, never outlives its store, and exists
only where asked for."""

import logging
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import DIM, HEADER, corrupt_atom, make_records, unit_vectors

from microlora.core.config import StoreConfig
from microlora.core.errors import CorruptAtomError
from microlora.server.config import ServeConfig
from store import AdapterStore, page_cache
from store import record as rec
from store.background_verify import VerifiedIds

WAIT_S = 30  # a bound for polls, never a sleep: each returns as soon as the thread is done


@pytest.fixture
def path(tmp_path):
    """A store of 40 atoms in "docs", closed (opened by each test as it needs)."""
    with AdapterStore.create(tmp_path / "s", HEADER) as s:
        s.put("docs", make_records(40))
    return tmp_path / "s"


@pytest.fixture
def hashed(monkeypatch):
    """Every checksum computed from now on, by the thread that computed it."""
    calls: list[str] = []
    real = rec.checksum
    monkeypatch.setattr(rec, "checksum", lambda payload: calls.append(
        threading.current_thread().name) or real(payload))
    return calls


def verify_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("microlora-verify")]


def gated(monkeypatch):
    """Hold the background thread at its first hash until the returned ``go`` is set; ``in_``
    is set once it is held there (so a test acts before it reaches anything else)."""
    in_, go, real = threading.Event(), threading.Event(), rec.verify

    def verify(value):
        if threading.current_thread().name.startswith("microlora-verify"):
            in_.set()
            assert go.wait(WAIT_S)
        return real(value)
    monkeypatch.setattr(rec, "verify", verify)
    return in_, go


def test_the_pass_checks_every_atom_once_and_then_reads_hash_none(path, hashed):
    ids = [r.id for r in make_records(40)]
    with AdapterStore(path, background_verify=True) as store:
        store.verify_in_background()
        assert store.wait_verified(WAIT_S)
        assert len(hashed) == 40 and all(n.startswith("microlora-verify") for n in hashed)
        hashed.clear()
        with store.read("docs") as reader:
            got = reader.gather(ids)
        assert [r.id for r in got] == ids
        assert hashed == []  # every checksum was checked by the thread


def test_the_pass_takes_the_ids_from_a_fresh_index_not_a_walk_of_lmdb(
        path, hashed, monkeypatch):
    recs = make_records(40)
    with AdapterStore(path) as store:
        store.search("docs", recs[0].embedding[None], 1)  # builds and saves the index
    walked = []
    real = AdapterStore.ids
    monkeypatch.setattr(AdapterStore, "ids", lambda *a: walked.append(a) or real(*a))
    with AdapterStore(path, background_verify=True) as store:
        store.verify_in_background()
        assert store.wait_verified(WAIT_S)
    assert walked == [] and len(hashed) == 40  # every atom checked, none found by a walk


def test_the_first_read_of_a_namespace_starts_the_pass(path, hashed):
    ids = [r.id for r in make_records(40)]
    with AdapterStore(path, readonly=True, background_verify=True) as store:
        assert store.get("docs", ids[:1])[0].id == ids[0]  # the first read: checks the rest
        assert store.wait_verified(WAIT_S)
        assert len(set(hashed) - {"MainThread"}) == 1  # one thread did it
        hashed.clear()
        store.get("docs", ids)
        assert hashed == []
        store.verify_in_background()  # asked again: nothing left to hash
        assert store.wait_verified(WAIT_S) and hashed == []
    assert verify_threads() == []


def test_an_atom_corrupted_before_the_pass_reaches_it_is_reported_as_a_read_would(
        path, monkeypatch, caplog):
    recs = make_records(40)
    victim = recs[-1]  # the last the pass reaches (ids in key order)
    in_, go = gated(monkeypatch)
    with AdapterStore(path, background_verify=True) as store, \
            caplog.at_level(logging.WARNING):
        store.verify_in_background()
        assert in_.wait(WAIT_S)  # the thread holds at its first record
        corrupt_atom(store, "docs", victim.id)
        go.set()
        assert store.wait_verified(WAIT_S)
        assert f"atom {victim.id} in 'docs' is corrupt (checksum" in caplog.text
        with pytest.raises(CorruptAtomError, match=f"atom {victim.id} in 'docs' is corrupt "
                                                   r"\(checksum.*microlora store verify"):
            store.get("docs", [victim.id])
        left_out: list[CorruptAtomError] = []
        with store.read("docs") as reader:  # what the composer does: leave it out, say which
            got = reader.gather([r.id for r in recs], on_corrupt=left_out.append)
        assert [e.atom_id for e in left_out] == [victim.id]
        assert [r.id for r in got] == [r.id for r in recs[:-1]]


def test_close_stops_the_pass_and_joins_its_thread(path, monkeypatch, hashed):
    in_, go = gated(monkeypatch)
    store = AdapterStore(path, background_verify=True)
    store.verify_in_background()
    assert in_.wait(WAIT_S)
    thread = store._background.thread
    closing = threading.Thread(target=store.close)
    closing.start()
    assert store._background._stop.wait(WAIT_S)  # close asked it to stop, and waits for it
    go.set()  # the batch in hand ends, then the thread sees the stop
    closing.join(WAIT_S)
    assert not closing.is_alive() and not thread.is_alive()
    assert len(hashed) < 40  # stopped, not run to the end
    assert verify_threads() == []
    store.verify_in_background(["docs"])  # a closed store starts nothing
    assert store._background.thread is None


def test_no_thread_when_the_option_is_off(path, hashed):
    with AdapterStore(path) as store:
        store.get("docs", [r.id for r in make_records(3)])
        store.verify_in_background()
        assert store._background.thread is None and verify_threads() == []
        assert store.wait_verified(0)
    assert StoreConfig().background_verify and ServeConfig().store.background_verify


def test_a_namespace_dropped_and_made_anew_is_checked_anew(path, hashed):
    recs = make_records(40)
    with AdapterStore(path, background_verify=True) as store:
        gen = store.generation("docs")
        store.verify_in_background()
        assert store.wait_verified(WAIT_S)
        store.drop("docs")
        store.put("docs", recs, dtype="bf16")  # the same ids, other bytes
        assert store.generation("docs") == gen  # counted from 0 again: the number is no guide
        hashed.clear()
        store.verify_in_background()
        assert store.wait_verified(WAIT_S)
        assert len(hashed) == 40  # the drop forgot every check: all hashed anew
        hashed.clear()
        with store.read("docs") as reader:
            assert [r.id for r in reader.gather([r.id for r in recs])] == [r.id for r in recs]
        assert hashed == []


def test_a_transaction_older_than_a_drop_shares_no_checks():
    checked = VerifiedIds()
    old, new = checked.of("docs", 1, txn_id=5)
    assert new and checked.of("docs", 1, txn_id=6) == (old, False)
    checked.forget("docs", last_txn_id=7)  # dropped, and made anew at generation 1 again
    stale, new = checked.of("docs", 1, txn_id=6)  # a reader that still sees the old one
    assert not new and stale is not old
    stale.ids.add("a")
    assert not checked.add("docs", old, ["b"])  # the background pass over the old one stops
    fresh, new = checked.of("docs", 1, txn_id=7)
    assert new and fresh.ids == set()


def test_compact_pauses_the_pass_and_it_resumes(path, monkeypatch, hashed):
    in_, go = gated(monkeypatch)
    with AdapterStore(path, background_verify=True) as store:
        store.verify_in_background()
        assert in_.wait(WAIT_S)
        compacting = threading.Thread(target=store.compact)
        compacting.start()
        assert store._background._stop.wait(WAIT_S)  # paused: compact waits for it
        go.set()
        compacting.join(WAIT_S)
        assert not compacting.is_alive()
        assert store.wait_verified(WAIT_S)
        hashed.clear()
        store.get("docs", [r.id for r in make_records(40)])
        assert hashed == []


def test_the_server_opens_its_store_with_the_pass(tmp_path, tiny_models):
    from microlora.server.service import open_service

    lm, emb = (str(p) for p in tiny_models)
    for on in (True, False):
        config = ServeConfig(store=StoreConfig(background_verify=on))
        service = open_service(tmp_path / f"s{on}", base_model=lm, embedder=emb, config=config)
        try:
            assert service.store._background.enabled is on
        finally:
            service.close()
    assert verify_threads() == []


def test_the_pass_first_holds_the_index_in_memory_and_reads_lmdb_into_the_page_cache(
        path, monkeypatch):
    read: list[list[str]] = []
    real = page_cache.read_through
    monkeypatch.setattr(page_cache, "read_through", lambda files, stop=None: read.append(
        [f.name for f in files]) or real(files, stop))
    queries = unit_vectors(5, DIM, seed=3)
    with AdapterStore(path) as s:
        want = s.search("docs", queries, k=4)  # and its index files written
    with AdapterStore(path, readonly=True, background_verify=True) as store:
        assert store.index("docs").mapped
        store.verify_in_background()
        assert store.wait_verified(WAIT_S)
        assert not store.index("docs").mapped  # read into memory: the same answers
        assert store.search("docs", queries, k=4) == want
        store.verify_in_background()  # a later pass reads nothing again
        assert store.wait_verified(WAIT_S)
    assert read == [["data.mdb"]]


def test_files_that_do_not_fit_in_half_the_available_memory_are_left_to_be_read_on_demand(
        path, monkeypatch):
    read: list[list[Path]] = []
    monkeypatch.setattr(page_cache, "read_through", lambda files, stop=None: read.append(files))
    with AdapterStore(path) as s:
        s.index("docs")  # its files written
    size = (path / "data.mdb").stat().st_size
    monkeypatch.setattr(page_cache.psutil, "virtual_memory",
                        lambda: SimpleNamespace(available=2 * size - 1))
    assert not page_cache.fits([path / "data.mdb"])
    with AdapterStore(path, readonly=True, background_verify=True) as store:
        store.verify_in_background()
        assert store.wait_verified(WAIT_S)
    assert read == []
    with AdapterStore(path, readonly=True) as store:  # nor is an index too large held
        monkeypatch.setattr(page_cache.psutil, "virtual_memory",
                            lambda: SimpleNamespace(available=0))
        assert not store.hold_index_in_memory("docs") and store.index("docs").mapped


def test_reading_through_stops_when_told_and_skips_what_cannot_be_read(tmp_path, monkeypatch):
    monkeypatch.setattr(page_cache, "CHUNK", 1024)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * 5000)
    b.write_bytes(b"y" * 100)
    assert page_cache.read_through([a, tmp_path / "missing", b]) == 5100
    stop = threading.Event()
    stop.set()
    assert page_cache.read_through([a, b], stop) == 1024  # one chunk, then it stops
