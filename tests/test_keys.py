"""API keys (``microlora keys``, ``microlora.server.keys``) without a server: names, grants,
concurrent changes and a running server's reload."""

from __future__ import annotations

import threading

import pytest
from click.testing import CliRunner
from conftest import HEADER, make_records

from microlora.cli import cli
from microlora.core.errors import MicroloraError, StoreError
from microlora.server.keys import KeyStore
from store import AdapterStore
from store.adapter_store import validate_namespace


def test_names_with_a_trailing_newline_are_refused(tmp_path):
    with pytest.raises(MicroloraError, match="invalid user name"):
        KeyStore(tmp_path).add("ana\n")
    with pytest.raises(StoreError, match="invalid namespace"):
        validate_namespace("docs\n")
    token, _ = KeyStore(tmp_path).add("ana")
    assert KeyStore(tmp_path).authenticate(token) is not None
    assert KeyStore(tmp_path).authenticate(token + "\n") is None


def test_a_grant_of_a_namespace_the_store_lacks_is_refused(tmp_path):
    with AdapterStore.create(tmp_path / "kb", HEADER) as s:
        s.put("wiki", make_records(1))
        s.put("user:bob", make_records(1, seed=1))
    runner = CliRunner()
    r = runner.invoke(cli, ["keys", "add", "ana", "--store", str(tmp_path / "kb"),
                            "--grant", "nosuch"])
    assert r.exit_code != 0
    assert "'nosuch' is not a namespace of this store" in r.output and "wiki" in r.output
    assert "user:bob" not in r.output and KeyStore(tmp_path / "kb").list() == []
    r = runner.invoke(cli, ["keys", "add", "ana", "--store", str(tmp_path / "kb"),
                            "--grant", "wiki"])
    assert r.exit_code == 0, r.output


def test_an_add_beside_a_revoke_undoes_neither(tmp_path, monkeypatch):
    # Each change reads keys.json, changes it and writes it back. Two threads are held
    # together right after their read: without a lock both get there (the barrier passes at
    # once) and the later write drops the other's change; with one, the second waits for the
    # first to finish and the barrier only times out.
    _, old = KeyStore(tmp_path).add("ana")
    barrier = threading.Barrier(2, timeout=1)
    load = KeyStore._load

    def held_load(self, force=False):
        records = load(self, force)
        if force:
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                pass
        return records

    monkeypatch.setattr(KeyStore, "_load", held_load)
    added = []
    threads = [threading.Thread(target=lambda: KeyStore(tmp_path).revoke(old.id)),
               threading.Thread(target=lambda: added.append(KeyStore(tmp_path).add("bob")[1]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.setattr(KeyStore, "_load", load)
    assert [r.id for r in KeyStore(tmp_path).list()] == [added[0].id]


def test_the_server_sees_a_change_within_one_mtime_tick(tmp_path):
    import os

    token, record = KeyStore(tmp_path).add("ana")
    served = KeyStore(tmp_path)
    assert served.authenticate(token) == record
    path = served.path
    before = path.stat()
    # a change of the same size in the same mtime tick (and, as inodes are reused, maybe
    # the same inode): only the content tells
    body = path.read_text().replace(record.sha256, "0" * 64)
    with open(path, "r+") as f:
        f.write(body)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    assert served.authenticate(token) is None


def test_keys_json_and_its_lock_are_private(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        KeyStore(tmp_path).add("ana")
    finally:
        os.umask(old)
    for path in tmp_path.glob("keys.json*"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
