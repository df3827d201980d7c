"""The CLI through click's CliRunner, with a temporary MICROLORA_HOME (see conftest)."""

import json

import pytest
from click.testing import CliRunner
from conftest import (
    HEADER,
    flip_byte_inside,
    make_records,
    save_tiny,
    stored_adapter_bytes,
    tiny_model,
    tree_bytes,
)

from microlora.cli import cli
from store import AdapterStore, StoreHeader


def run(*args, input=None):
    return CliRunner().invoke(cli, list(map(str, args)), input=input)


@pytest.fixture
def store_dir(tmp_path):
    with AdapterStore.create(tmp_path / "s", HEADER) as s:
        s.put("docs", make_records(4))
        s.put("user:bob", make_records(2, seed=1))
    return tmp_path / "s"


def test_help_teaches():
    out = run("--help").output
    assert "doctor" in out and "store" in out
    assert "verify" in run("store", "--help").output


@pytest.mark.parametrize("amx", [True, False])
def test_doctor_says_which_dtype_auto_holds_the_base_in(tiny_models, monkeypatch, amx):
    import torch

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    lm, embedder = tiny_models
    result = run("doctor", "--base-model", lm, "--embedder", embedder)
    assert result.exit_code == 0, result.output
    held = "bf16" if amx else "fp32"
    assert f"dtype torch.{'bfloat16' if amx else 'float32'}" in result.output
    assert f"bf16 matmuls {'fast' if amx else 'slow'} here" in result.output
    assert f"auto holds the base in {held}" in result.output


def test_ls_and_stats(store_dir):
    result = run("store", "ls", "--store", store_dir)
    assert result.exit_code == 0
    assert "docs\t4 atoms" in result.output and "user:bob\t2 atoms" in result.output
    data = json.loads(run("store", "stats", "--store", store_dir, "--json").output)
    assert {n["namespace"]: n["atoms"] for n in data["namespaces"]} == {"docs": 4, "user:bob": 2}
    assert data["header"]["base_name"] == "tiny" and data["disk_bytes"] > 0
    table = run("store", "stats", "--store", store_dir).output
    assert "KiB/atom" in table and "tiny-emb" in table


def test_verify_reports_corruption_with_exit_code(store_dir):
    assert run("store", "verify", "--store", store_dir).output.strip() == "ok: 6 atoms verified"
    victim = make_records(2, seed=1)[1]
    flip_byte_inside(store_dir, stored_adapter_bytes(victim.adapter)[:64])
    before = tree_bytes(store_dir)
    result = run("store", "verify", "--store", store_dir)
    assert result.exit_code == 1
    assert f"BAD user:bob/{victim.id}" in result.output and "1 of 6 atoms are corrupt" in \
        result.output
    assert {p: b for p, b in tree_bytes(store_dir).items() if p.name != "lock.mdb"} == {
        p: b for p, b in before.items() if p.name != "lock.mdb"}


def test_rm_atoms_and_namespaces(store_dir):
    result = run("store", "rm", "--store", store_dir, "docs", "--atom", "atom000000", "--yes")
    assert result.exit_code == 0 and "deleted 1 of 1" in result.output
    assert run("store", "rm", "--store", store_dir, "user:bob", input="n\n").exit_code == 1
    result = run("store", "rm", "--store", store_dir, "user:bob", input="y\n")
    assert "dropped namespace 'user:bob' (2 atoms)" in result.output
    assert "user:bob" not in run("store", "ls", "--store", store_dir).output


def test_user_errors_are_one_clean_line(tmp_path, store_dir):
    result = run("store", "ls", "--store", tmp_path / "nope")
    assert result.exit_code == 1 and "not a microlora store" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "nope").exists()
    result = run("store", "rm", "--store", store_dir, "user:carol", "--yes")
    assert result.exit_code == 1 and "no namespace 'user:carol'" in result.output
    assert "(it has: docs, user:bob)" in result.output
    result = run("store", "verify", "--store", store_dir, "-n", "bad name")
    assert result.exit_code == 1 and "invalid namespace" in result.output


def test_verify_against_a_base_model(tmp_path):
    from microlora.core.models import fingerprint_model

    ours, other = save_tiny(tmp_path / "ours", seed=0), save_tiny(tmp_path / "other", seed=1)
    header = StoreHeader(**{**HEADER.__dict__,
                            "base_fingerprint": fingerprint_model(tiny_model("llama", seed=0))})
    with AdapterStore.create(tmp_path / "s", header) as s:
        s.put("docs", make_records(1, fingerprint=header.base_fingerprint))
    result = run("store", "verify", "--store", tmp_path / "s", "--base-model", ours)
    assert result.exit_code == 0 and "belongs to base model ours" in result.output
    result = run("store", "verify", "--store", tmp_path / "s", "--base-model", other)
    assert result.exit_code == 1 and "compiled for base model" in result.output
    assert "--base-model" in result.output
