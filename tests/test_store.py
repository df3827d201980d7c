"""The adapter store: round trips, zero-copy reads, transactions, corruption, identity checks,
and the FAISS index against brute force."""

import json
import logging

import faiss
import lmdb
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import (
    DIM,
    HEADER,
    SHAPES,
    corrupt_atom,
    flip_byte_inside,
    make_records,
    stored_adapter_bytes,
    tree_bytes,
    unit_vectors,
    zero_leaf_page_of,
)

from microlora.cli import cli
from microlora.core.errors import (
    CorruptAtomError,
    StoreError,
    StoreMismatchError,
    UnknownDocumentError,
    UnknownNamespaceError,
)
from store import AdapterStore, StoreHeader
from store import record as rec


@pytest.fixture
def store(tmp_path):
    with AdapterStore.create(tmp_path / "s", HEADER) as s:
        yield s


def test_round_trip_keeps_everything(store):
    recs = make_records(3)
    assert store.put("docs", recs, dtype="bf16") == 3
    got = store.get("docs", [recs[2].id, recs[0].id])
    for want, have in zip([recs[2], recs[0]], got):
        assert (have.id, have.text, have.source, have.start, have.end, have.config) == (
            want.id, want.text, want.source, want.start, want.end, want.config)
        np.testing.assert_array_equal(have.embedding, want.embedding)
        assert set(have.adapter.modules) == set(SHAPES)
        got_modules = have.adapter.unpack()
        for name, (A, B) in want.adapter.unpack().items():
            assert got_modules[name][0].dtype == torch.bfloat16
            assert torch.equal(got_modules[name][0], A.to(torch.bfloat16))
            assert torch.equal(got_modules[name][1], B.to(torch.bfloat16))


def test_fp16_storage(store):
    rec = make_records(1)[0]
    store.put("docs", [rec], dtype=torch.float16)
    A = store.get("docs", [rec.id])[0].adapter.unpack()["model.layers.2.mlp.up_proj"][0]
    assert A.dtype == torch.float16
    assert torch.equal(A, rec.adapter.unpack()["model.layers.2.mlp.up_proj"][0].half())


def test_reads_are_zero_copy_views_of_the_map(store):
    rec = make_records(1)[0]
    store.put("docs", [rec], dtype="bf16")  # (an int8 adapter is dequantized on every read)
    with store.read("docs") as reader:
        first = reader.get(rec.id).adapter.flat
        second = reader.get(rec.id).adapter.flat
        assert first.data_ptr() == second.data_ptr()  # both point into LMDB's memory map
        copied = reader.get(rec.id, copy=True).adapter.flat
        assert copied.data_ptr() != first.data_ptr()
        assert torch.equal(copied, first)


def test_identical_atoms_are_stored_once(store):
    recs = make_records(2)
    assert store.put("docs", recs) == 2
    gen = store.generation("docs")
    assert store.put("docs", recs) == 0
    assert store.count("docs") == 2 and store.generation("docs") == gen


def test_namespaces_delete_drop_and_stats(store):
    store.put("docs", make_records(4, seed=0))
    store.put("user:alice", make_records(2, seed=1))
    assert sorted(store.namespaces()) == ["docs", "user:alice"]
    assert store.delete("docs", ["atom000001", "nope"]) == 1
    assert sorted(store.ids("docs")) == ["atom000000", "atom000002", "atom000003"]
    stats = {s.namespace: s for s in store.stats()}
    assert stats["docs"].atoms == 3 and stats["user:alice"].atoms == 2
    adapter_bytes = make_records(1)[0].nbytes() // 4  # fp32 in memory, int8 on disk
    assert adapter_bytes < stats["docs"].bytes_per_atom <= adapter_bytes + 4096  # + a page
    read_before = store.get("user:alice", store.ids("user:alice")[:1])  # keeps its handle
    assert len(read_before) == 1
    assert store.drop("user:alice") == 2
    assert store.namespaces() == ["docs"]
    with pytest.raises(UnknownNamespaceError, match="no namespace 'user:alice'.*has: docs"):
        store.get("user:alice", ["atom010000"])


def test_unknown_atom_and_bad_namespace_names(store):
    store.put("docs", make_records(1))
    with pytest.raises(StoreError, match="not in namespace"):
        store.get("docs", ["missing"])
    for bad in ["", "__meta__", "a b", "../x", "x" * 200]:
        with pytest.raises(StoreError, match="invalid namespace"):
            store.put(bad, make_records(1))


def test_a_bad_record_aborts_the_whole_put(store):
    store.put("docs", make_records(2, seed=0))
    before = store.generation("docs")
    batch = make_records(3, seed=1) + make_records(1, seed=2, dim=DIM + 1)
    with pytest.raises(StoreError, match="embedding"):
        store.put("docs", batch)
    other = make_records(1, seed=3, fingerprint="other-model")
    with pytest.raises(StoreMismatchError, match="base model"):
        store.put("docs", make_records(2, seed=4) + other)
    assert store.count("docs") == 2 and store.generation("docs") == before


def test_an_atom_with_nan_or_inf_is_refused_by_name(store):
    import dataclasses

    store.put("docs", make_records(2, seed=0))
    good = make_records(3, seed=1)
    flat = good[1].adapter.flat.clone()
    flat[5] = float("nan")
    nan = dataclasses.replace(good[1], adapter=dataclasses.replace(good[1].adapter, flat=flat))
    with pytest.raises(StoreError, match=f"atom {nan.id} .*NaN or inf values in its adapter"):
        store.put("docs", [good[0], nan, good[2]])
    big = good[1].adapter.flat.clone()
    big[0] = 1e6  # finite in fp32 and bf16, inf once stored as fp16
    overflow = dataclasses.replace(good[1], adapter=dataclasses.replace(good[1].adapter,
                                                                        flat=big))
    store.put("other", [overflow])
    with pytest.raises(StoreError, match="NaN or inf values in its adapter"):
        store.put("fp16", [overflow], dtype=torch.float16)
    embedding = good[2].embedding.copy()
    embedding[0] = np.inf
    with pytest.raises(StoreError, match=f"atom {good[2].id} .*NaN or inf values in its emb"):
        store.put("docs", [dataclasses.replace(good[2], embedding=embedding)])
    assert store.count("docs") == 2 and "fp16" not in store.namespaces()


def test_wrong_base_model_or_embedder_is_refused(tmp_path, store):
    store.put("docs", make_records(1))
    store.close()
    path = store.path
    before = tree_bytes(path)
    other = StoreHeader(**{**HEADER.__dict__, "base_fingerprint": "f" * 32, "base_name": "llama"})
    with pytest.raises(StoreMismatchError, match=r"--base-model"):
        AdapterStore.open_or_create(path, other)
    other_emb = StoreHeader(**{**HEADER.__dict__, "embedder_fingerprint": "0" * 32})
    with pytest.raises(StoreMismatchError, match=r"--embedder"):
        AdapterStore.open_or_create(path, other_emb)
    assert tree_bytes(path) == before
    AdapterStore.open_or_create(path, HEADER).close()  # the right identity opens fine


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a microlora store"):
        AdapterStore(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()  # nothing created by a failed open
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "data.mdb").write_bytes(b"this is not lmdb" * 100)
    with pytest.raises(StoreError, match="not a readable microlora store"):
        AdapterStore(tmp_path / "plain", readonly=True)
    with pytest.raises(StoreError, match="already a store"):
        AdapterStore.create(tmp_path / "plain", HEADER)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not empty"):
        AdapterStore.create(tmp_path / "notes", HEADER)
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["todo.txt"]


def test_other_format_version_is_refused(store):
    store.close()
    env = lmdb.open(str(store.path), max_dbs=4)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"__meta__", txn=txn)
        txn.put(b"header", json.dumps({**HEADER.__dict__, "format_version": 99}).encode(),
                db=meta)
    env.close()
    with pytest.raises(StoreError, match="v99.*upgrade microlora"):
        AdapterStore(store.path)


def test_verify_names_the_corrupt_atom(store):
    recs = make_records(5)
    store.put("docs", recs)
    assert store.verify().ok and store.verify().checked == 5
    victim = recs[3]
    corrupt_atom(store, "docs", victim.id)
    report = store.verify()
    assert [(ns, i) for ns, i, _ in report.bad] == [("docs", victim.id)]
    assert "checksum" in report.bad[0][2]


def test_a_corrupt_atom_is_refused_by_name_when_first_read(store):
    recs = make_records(5)
    store.put("docs", recs)
    victim = recs[3]
    corrupt_atom(store, "docs", victim.id)
    with pytest.raises(CorruptAtomError, match=f"atom {victim.id} in 'docs' is corrupt "
                                               r"\(checksum.*microlora store verify") as e:
        store.get("docs", [victim.id])
    assert (e.value.namespace, e.value.atom_id) == ("docs", victim.id)
    assert "checksum" in e.value.problem
    others = [r.id for r in recs if r is not victim]
    assert [r.id for r in store.get("docs", others)] == others


def test_an_index_rebuild_leaves_out_an_atom_that_does_not_decode(store, caplog):
    recs = make_records(5)
    store.put("docs", recs)
    victim = recs[2]
    flip_byte_inside(store.path, b'\\"id\\": \\"' + victim.id.encode())  # now another id
    store.close()
    with AdapterStore(store.path) as again, caplog.at_level(logging.WARNING):
        assert again.stats()[0].index == "stale"  # no index yet: built from LMDB
        found = again.search("docs", recs[2].embedding[None], 5)[0]
    assert sorted(i for i, _ in found) == sorted(r.id for r in recs if r is not victim)
    assert f"atom {victim.id} in 'docs' is corrupt (stored under {victim.id} but" in caplog.text


def test_an_index_rebuild_reads_embeddings_as_copies_without_decoding_adapters(store, monkeypatch):
    recs = make_records(4)
    store.put("docs", recs)
    monkeypatch.setattr(rec, "build", lambda *a, **k: pytest.fail("an adapter was decoded"))
    with store.read("docs") as reader:
        got = dict(reader.embeddings())
    assert set(got) == {r.id for r in recs}
    for r in recs:  # the store's float32 copy, owning its bytes (a view would pin the record)
        assert got[r.id].flags.owndata and np.array_equal(got[r.id], r.embedding)
    store._forget_index("docs")
    assert store.search("docs", recs[1].embedding[None], 1)[0][0][0] == recs[1].id


def test_each_atom_is_hashed_once_per_generation(store, monkeypatch):
    """Hashing every fetch would cost about the whole fetch budget: an atom's checksum is
    checked the first time this process reads it in this generation of its namespace."""
    recs = make_records(4)
    store.put("docs", recs[:3])
    hashed = []
    real = rec.verify
    monkeypatch.setattr(rec, "verify", lambda value: hashed.append(1) or real(value))
    for _ in range(3):
        with store.read("docs") as reader:
            reader.gather([r.id for r in recs[:3]])
    assert len(hashed) == 3
    store.put("docs", recs[3:])  # a new generation: its atoms may differ, check again
    store.get("docs", [r.id for r in recs])
    store.get("docs", [r.id for r in recs])
    assert len(hashed) == 3 + 4


def test_a_damaged_lmdb_page_is_a_clear_error_that_says_to_run_verify(tmp_path):
    recs = make_records(40)  # one record a leaf page, one transaction: no stale copies
    with AdapterStore.create(tmp_path / "s", HEADER) as s:
        s.put("docs", recs)
    victim = recs[0]  # the first leaf: where a walk starts (one stepping onto a damaged
    # page further on trips an assertion inside LMDB that ends the process)
    zero_leaf_page_of(tmp_path / "s", stored_adapter_bytes(victim.adapter)[:64])
    with AdapterStore(tmp_path / "s") as s:
        with pytest.raises(StoreError, match="damaged.*microlora store verify") as e:
            s.get("docs", [victim.id])
        assert isinstance(e.value.__cause__, lmdb.CorruptedError)
        assert s.get("docs", [recs[20].id])[0].text == recs[20].text  # the rest still reads
        with pytest.raises(StoreError, match="damaged"):
            s.ids("docs")
    for command, message in [(["rm", "docs", "--atom", victim.id, "--yes"],
                              "microlora store verify"),
                             (["verify"], "DAMAGED docs: LMDB cannot read its pages")]:
        result = CliRunner().invoke(cli, ["store", *command, "--store", str(tmp_path / "s")])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def test_index_search_matches_brute_force(store):
    recs = make_records(40)
    store.put("docs", recs[:25])
    store.put("docs", recs[25:])  # the second put extends the cached index in place
    queries = unit_vectors(5, DIM, seed=9)
    mat = np.stack([r.embedding for r in recs])
    want = np.argsort(-(queries @ mat.T), axis=1)[:, :4]
    got = store.search("docs", queries, k=4)
    assert [[i for i, _ in row] for row in got] == [[recs[j].id for j in row] for row in want]
    for row, q in zip(got, queries):
        assert [s for _, s in row] == pytest.approx(
            [float(q @ store.get("docs", [i])[0].embedding) for i, _ in row], abs=1e-5)
    assert store.index("docs").exact


def test_index_is_rebuilt_when_stale_or_missing(store):
    recs = make_records(10)
    store.put("docs", recs)
    store.search("docs", recs[0].embedding, k=1)
    store.delete("docs", [recs[0].id])
    assert store.search("docs", recs[0].embedding, k=10)[0][0][0] != recs[0].id
    assert len(store.search("docs", recs[0].embedding, k=10)[0]) == 9
    store.close()
    for f in (store.path / "index").iterdir():
        f.write_bytes(b"garbage")
    with AdapterStore(store.path) as again:
        assert again.search("docs", recs[1].embedding, k=1)[0][0][0] == recs[1].id


def test_large_namespaces_use_an_approximate_index(tmp_path):
    n = 600
    with AdapterStore.create(tmp_path / "s", HEADER, exact_limit=100) as s:
        recs = make_records(n)
        s.put("docs", recs)
        assert not s.index("docs").exact
        queries = unit_vectors(50, DIM, seed=5)
        mat = np.stack([r.embedding for r in recs])
        exact = np.argsort(-(queries @ mat.T), axis=1)[:, :8]
        got = s.search("docs", queries, k=8)
        hits = sum(len({recs[j].id for j in e} & {i for i, _ in g}) for e, g in zip(exact, got))
        assert hits / exact.size >= 0.95
        assert {r.index for r in s.stats()} == {"ivf"}
        # its vectors are kept in fp16: half the bytes, scores within fp16's rounding
        assert isinstance(s.index("docs").index, faiss.IndexIVFScalarQuantizer)
        by_id = {r.id: r.embedding for r in recs}
        for q, row in zip(queries, got):
            for atom_id, score in row:
                assert abs(score - float(q @ by_id[atom_id])) < 2e-3


def test_readonly_open_changes_nothing(store):
    recs = make_records(5)
    store.put("docs", recs)
    store.delete("docs", [recs[0].id])  # leaves the index stale
    store.close()
    before = tree_bytes(store.path)
    with AdapterStore(store.path, readonly=True) as ro:
        assert ro.search("docs", recs[1].embedding, k=1)[0][0][0] == recs[1].id
        ro.verify()
        ro.stats()
        with pytest.raises(StoreError, match="read-only"):
            ro.put("docs", make_records(1, seed=7))
    after = tree_bytes(store.path)
    assert {p: b for p, b in after.items() if p.name != "lock.mdb"} == {
        p: b for p, b in before.items() if p.name != "lock.mdb"}


def test_index_extended_by_puts_is_saved_on_close(store):
    store.put("docs", make_records(3, seed=0))
    store.search("docs", unit_vectors(1, DIM), k=1)  # builds and saves the index
    store.put("docs", make_records(3, seed=1))  # extends it in memory
    store.close()
    with AdapterStore(store.path, readonly=True) as again:
        assert [s.index for s in again.stats()] == ["exact"]  # fresh on disk, not stale
        assert len(again.index("docs").ids) == 6


def test_gather_reads_whole_records_in_order_from_one_transaction(store):
    recs = make_records(5)
    store.put("docs", recs, dtype="bf16")  # zero-copy views: bf16 (int8 is dequantized)
    pick = [recs[3], recs[0], recs[4]]
    with store.read("docs") as reader:
        got = reader.gather([r.id for r in pick])
        assert [(g.id, g.text, g.source) for g in got] == [(r.id, r.text, r.source) for r in pick]
        assert got[1].adapter.flat.data_ptr() == reader.get(recs[0].id).adapter.flat.data_ptr()
        with pytest.raises(StoreError, match="not in namespace"):
            reader.gather([recs[0].id, "missing"])
    for g, r in zip(store.get("docs", [r.id for r in pick]), pick):
        assert torch.equal(g.adapter.flat, r.adapter.flat.bfloat16())


def test_a_failed_first_put_leaves_no_namespace(tmp_path):
    with AdapterStore.create(tmp_path / "s", HEADER, map_size=256 * 1024) as small:
        with pytest.raises(StoreError, match="map size.*nothing from this batch"):
            small.put("fresh", make_records(200))
        assert small.namespaces() == []
        small.put("fresh", make_records(2))  # the store still works afterwards
        assert small.count("fresh") == 2
    with AdapterStore.create(tmp_path / "t", HEADER) as s, pytest.raises(StoreError, match="id"):
        bad = make_records(1)[0]
        bad.id = ""
        s.put("docs", [bad])


def test_forgetting_a_document_keeps_atoms_another_document_shares(store):
    records = make_records(4, seed=7)
    store.put("user:ana", records)
    a, b, c, d = (r.id for r in records)
    store.put_documents("user:ana", {"one": [a, b, c], "two": [c, d]})
    assert store.documents("user:ana") == {"one": [a, b, c], "two": [c, d]}
    assert store.delete_document("user:ana", "one") == 2
    assert sorted(store.ids("user:ana")) == sorted([c, d])
    found = {i for i, _ in store.search("user:ana", np.stack([r.embedding for r in records]),
                                        4)[0]}
    assert found == {c, d}  # the index no longer returns what was forgotten
    with pytest.raises(UnknownDocumentError, match="no document 'one'"):
        store.delete_document("user:ana", "one")
    store.put("user:anabel", make_records(1, seed=8))
    store.put_documents("user:anabel", {"one": [make_records(1, seed=8)[0].id]})
    assert store.drop("user:ana") == 2
    assert "user:ana" not in store.namespaces()
    assert list(store.documents("user:anabel")) == ["one"]  # a prefix is not the namespace


def test_forgotten_atoms_leave_no_vector_in_an_index_file(store):
    """A deletion takes the namespace's index files with it (rebuilt on next use): a stale
    index file would keep the forgotten atoms' ids and embeddings on disk."""
    records = make_records(4, seed=9)
    store.put("user:ana", records)
    store.put_documents("user:ana", {"one": [records[0].id], "two": [records[1].id]})
    store.index("user:ana").save(store.layout.index("user:ana"))  # as close() would
    store.delete_document("user:ana", "one")
    store.index("user:ana").save(store.layout.index("user:ana"))
    store.delete("user:ana", [records[1].id])
    on_disk = b"".join(f.read_bytes() for f in store.layout.index("user:ana").parent.glob("*"))
    assert records[0].id.encode() not in on_disk and records[1].id.encode() not in on_disk
    found = {i for i, _ in store.search("user:ana", np.stack([r.embedding for r in records]),
                                        4)[0]}
    assert found == {r.id for r in records[2:]}


def test_a_handle_taken_before_a_drop_never_reads_another_namespace(store):
    """A request in flight holds bob's database handle when bob's namespace is dropped and
    ana's is created: through that handle it must find nothing, not ana's atoms (LMDB gives
    a closed handle's slot to the next database opened)."""
    store.put("user:bob", make_records(2, seed=1))
    held = store._db("user:bob")
    assert store.drop("user:bob") == 2
    store.put("user:ana", make_records(3, seed=2))
    with store._env.begin(db=held) as txn:
        assert list(txn.cursor()) == []
    with pytest.raises(UnknownNamespaceError):
        store.count("user:bob")
    assert store.put("user:bob", make_records(1, seed=3)) == 1  # and it comes back empty
    assert store.count("user:bob") == 1 and store.count("user:ana") == 3


def test_store_files_are_private_to_their_owner(tmp_path):
    # every tenant's text is in data.mdb and the index: no other user may read them
    import os
    import stat

    old = os.umask(0o022)
    try:
        with AdapterStore.create(tmp_path / "s", HEADER) as s:
            s.put("docs", make_records(3))
            s.search("docs", unit_vectors(1, DIM), k=1)
    finally:
        os.umask(old)
    root = tmp_path / "s"
    modes = {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [root, *root.rglob("*")]}
    assert {"data.mdb", "lock.mdb", "index/docs.faiss"} <= set(modes)
    assert modes == {p: 0o700 if (root / p).is_dir() else 0o600 for p in modes}


def test_the_namespace_limit_is_a_clear_error_and_a_fuller_store_still_opens(tmp_path):
    with AdapterStore.create(tmp_path / "s", HEADER, max_namespaces=2) as s:
        s.put("a", make_records(1, seed=1))
        s.put("b", make_records(1, seed=2))
        with pytest.raises(StoreError, match="limit of 2 namespaces.*--max-namespaces"):
            s.put("c", make_records(1, seed=3))
        assert s.namespaces() == ["a", "b"]
    with AdapterStore(tmp_path / "s", readonly=True, max_namespaces=1) as s:
        assert [s.count(ns) for ns in s.namespaces()] == [1, 1]  # opened as it is
    with AdapterStore(tmp_path / "s", max_namespaces=3) as s:
        s.put("c", make_records(1, seed=3))


def test_manifests_are_written_with_their_atoms_and_a_forgotten_document_stays_forgotten(
        store):
    from store import BatchDocuments

    r = make_records(4, seed=5)
    one, two = {"one": [r[0].id, r[1].id]}, {"two": [r[1].id, r[2].id, r[3].id]}
    store.put("ns", r[:2], documents=BatchDocuments(one | two, frozenset(["one", "two"])))
    assert store.documents("ns") == one | two  # in the atoms' own transaction
    store.delete_document("ns", "two")  # while "two" still compiles
    store.put("ns", r[2:], documents=BatchDocuments(two, frozenset()))
    assert sorted(store.ids("ns")) == sorted([r[0].id, r[1].id])  # nothing of "two" came back
    assert store.documents("ns") == one
    store.drop("ns")
    with pytest.raises(UnknownNamespaceError, match="deleted while"):
        store.put("ns", r, create=False)
    assert "ns" not in store.namespaces()


def test_jobs_are_kept_until_ended_and_go_with_their_namespace(tmp_path, store):
    store.put("user:ana", make_records(1, seed=3))
    store.put_job("user:ana", "job-a", {"status": "queued"}, {"documents": ["text a"]})
    store.put_job("user:ana", "job-b", {"status": "queued"}, {"documents": ["text b"]})
    store.put_job("user:bob", "job-c", {"status": "queued"}, {"documents": ["text c"]})
    store.put_job("user:ana", "job-a", {"status": "running"})  # the body stays
    store.end_job("user:ana", "job-b", {"status": "done"})  # the body goes
    assert sorted(store.jobs()) == [("user:ana", "job-a", {"status": "running"}),
                                    ("user:ana", "job-b", {"status": "done"}),
                                    ("user:bob", "job-c", {"status": "queued"})]
    assert store.job_body("user:ana", "job-a") == {"documents": ["text a"]}
    assert store.job_body("user:ana", "job-b") is None
    store.drop("user:ana")  # in the drop's own transaction: no job brings it back
    assert store.jobs() == [("user:bob", "job-c", {"status": "queued"})]
    assert store.job_body("user:ana", "job-a") is None
    store.end_job("user:bob", "job-c", None)
    assert store.jobs() == [] and store.job_body("user:bob", "job-c") is None


def test_compacting_leaves_no_byte_of_what_was_forgotten_and_frees_namespace_slots(tmp_path):
    import os

    from click.testing import CliRunner

    from microlora.cli import cli
    from store.maintenance import hold_shared

    path = tmp_path / "s"
    secret = make_records(3, seed=11)
    for r in secret:
        r.text = f"the vault code is {r.id[-6:]}"
    with AdapterStore.create(path, HEADER, max_namespaces=2) as s:
        s.put("user:ana", secret)
        s.put_documents("user:ana", {"vault": [r.id for r in secret]})
        s.put_job("user:ana", "job-1", {"status": "queued"},  # a server's job, the text too
                  {"documents": [{"text": "the vault code is 000000"}]})
        s.put("docs", make_records(2, seed=12))
        s.delete_document("user:ana", "vault")
        s.drop("user:ana")
        with pytest.raises(StoreError, match="limit of 2 namespaces"):
            s.put("user:bob", make_records(1, seed=13))  # the dropped one still counts
        assert b"the vault code is" in (path / "data.mdb").read_bytes()  # freed, not erased
        other = hold_shared(path)  # as another process's open AdapterStore holds it
        with pytest.raises(StoreError, match="open elsewhere"):
            s.compact()
        os.close(other)
    done = CliRunner().invoke(cli, ["store", "compact", "--store", str(path)])
    assert done.exit_code == 0 and "compacted" in done.output, done.output
    data = (path / "data.mdb").read_bytes()
    assert b"the vault code is" not in data and b"user:ana" not in data
    assert oct(path.joinpath("data.mdb").stat().st_mode & 0o777) == "0o600"
    with AdapterStore(path, max_namespaces=2) as s:
        assert s.namespaces() == ["docs"] and s.verify().ok and s.count("docs") == 2
        s.put("user:bob", make_records(1, seed=13))
        assert s.compact()[1] > 0 and s.count("user:bob") == 1  # and it works open, twice
