"""int8 adapters in the store: the error each row's scale allows, old bf16 records and stores
still read, composed deltas stay close, re-encoding a store, and the bytes a default atom
takes on disk."""

import dataclasses
import json
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import HEADER, SHAPES, make_records, random_adapter

from microlora.cli import cli
from microlora.core.config import StoreConfig, TargetSpec
from microlora.core.errors import MicroloraError, StoreError
from microlora.core.pack import Packed, compose
from microlora.core.targets import select_targets
from store import AdapterStore
from store import record as rec
from store.header import FORMAT_VERSION
from store.quantize import dequantize, quantize, row_blocks

V1_RECORD = Path(__file__).parent / "data" / "atom_record_v1_bf16.bin"  # written by record v1


def _rows(flat: torch.Tensor, packed: Packed) -> list[torch.Tensor]:
    """``flat`` cut into the rows that each get one scale, in order."""
    return [row for offset, n, length in row_blocks(packed.layout)
            for row in flat[offset:offset + n * length].view(n, length)]


def test_every_value_comes_back_within_half_its_rows_scale():
    adapter = random_adapter(SHAPES, rank=2, seed=3)
    name = "model.layers.2.mlp.up_proj"
    A, B = adapter[name]
    A[1] *= 1e-3  # one rank component far smaller than the other
    B[:, 0] *= 50.0  # and one column of B far larger
    adapter["model.layers.2.mlp.down_proj"][0][0] = 0.0  # an all-zero row
    packed = Packed.of(adapter)
    q, scales = quantize(packed)
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16
    assert q.numel() == packed.layout.size and scales.numel() == 2 * 2 * len(SHAPES)
    back = dequantize(q, scales, packed.layout).flat
    rows, got = _rows(packed.flat, packed), _rows(back, packed)
    assert len(rows) == scales.numel()
    for x, y, s in zip(rows, got, scales.float()):
        # the scale is the row's own (absmax / 127, to bf16 precision), not a shared one ...
        assert s == pytest.approx(float(x.abs().max()) / 127, rel=2 ** -8, abs=0)
        # ... and every value is within half of it
        assert float((x - y).abs().max()) <= float(s) / 2 * (1 + 1e-6)
    # rows: up_proj's A (2), its B transposed (2), then down_proj's A (2) and B (2)
    assert float(scales[1]) < float(scales[0]) / 100  # the small component has its own scale
    assert float(scales[2]) > float(scales[3]) * 10  # so has the large column of B
    assert float(scales[4]) == 0 and float(got[4].abs().max()) == 0  # the zero row stays 0


def test_quantizing_a_dequantized_adapter_gives_the_same_bytes():
    packed = Packed.of(random_adapter(SHAPES, rank=2, seed=4))
    q, scales = quantize(packed)
    again = quantize(dequantize(q, scales, packed.layout))
    assert torch.equal(again[0], q) and torch.equal(again[1], scales)


def test_a_batch_of_records_is_encoded_together_as_each_alone():
    recs = make_records(4, seed=7)
    odd = random_adapter({"x": (8, 16)}, rank=1, seed=9)  # another layout in the same batch
    recs.insert(2, dataclasses.replace(recs[0], id="odd", adapter=Packed.of(odd)))
    recs[1].adapter.flat[:] = 0.0  # all-zero rows keep scale 0
    for dtype in ("int8", "bf16"):
        together = [rec.decode(v) for v in rec.encode_many(recs, dtype)]
        alone = [rec.decode(rec.encode(r, dtype)) for r in recs]
        for got, want, r in zip(together, alone, recs):
            assert got.id == r.id and got.adapter.layout == r.adapter.layout
            assert torch.equal(got.adapter.flat, want.adapter.flat)  # its own rows' scales


def test_a_bf16_record_written_by_the_old_format_still_decodes():
    value = V1_RECORD.read_bytes()
    assert rec.verify(value) is None
    assert int.from_bytes(value[4:8], "little") == 1  # record version 1
    want = make_records(1, seed=5)[0]
    got = rec.decode(value)
    assert (got.id, got.text, got.config) == (want.id, want.text, want.config)
    assert got.adapter.flat.dtype == torch.bfloat16
    assert torch.equal(got.adapter.flat, want.adapter.flat.bfloat16())
    np.testing.assert_array_equal(got.embedding, want.embedding)
    # bf16 is still written as then: version 1, the same tensors and metadata (not the same
    # bytes: safetensors orders its header's keys differently from one process to the next)
    again = rec.encode(want, "bf16")
    assert again[:8] == value[:8]  # magic and record version 1
    (meta, tensors), (old_meta, old_tensors) = rec._parse(again), rec._parse(value)
    assert {k: json.loads(v) for k, v in meta.items()} == \
        {k: json.loads(v) for k, v in old_meta.items()}
    assert tensors.keys() == old_tensors.keys()
    assert all(tensors[k][1] == old_tensors[k][1]  # dtype, and the values as stored
               and np.array_equal(tensors[k][0], old_tensors[k][0]) for k in tensors)


def _header_changed(value: bytes, change) -> bytes:
    """``value`` with its safetensors header edited by ``change`` (its checksum now wrong)."""
    size = int.from_bytes(value[24:32], "little")
    header = json.loads(value[32:32 + size])
    change(header)
    text = json.dumps(header).encode()
    return value[:24] + len(text).to_bytes(8, "little") + text + value[32 + size:]


def _adapter(header: dict) -> dict:
    return header[rec.ADAPTER_KEY]


@pytest.mark.parametrize("change, problem", [
    (lambda h: _adapter(h)["data_offsets"].__setitem__(1, 10**9), "does not fit"),
    (lambda h: _adapter(h)["shape"].__setitem__(0, _adapter(h)["shape"][0] + 1),
     "does not fit"),
    (lambda h: _adapter(h).__setitem__("dtype", "F64"), "unsupported tensor dtype F64"),
    (lambda h: _adapter(h).__setitem__("dtype", "BF16"), "does not fit"),  # 2 bytes a value
    (lambda h: h.pop(rec.SCALES_KEY), "needs .* bf16 scales"),
], ids=["offsets past the end", "shape larger than its bytes", "unknown dtype",
        "bytes of another dtype", "no scales"])
def test_a_record_whose_tensors_do_not_fit_is_a_store_error(change, problem):
    value = rec.encode(make_records(1, seed=2)[0], "int8")
    assert rec.decode(value).id  # intact, it decodes
    with pytest.raises(StoreError, match=problem):
        rec.decode(_header_changed(value, change))


def test_a_version_1_store_reads_and_is_marked_2_by_its_first_int8_atom(tmp_path):
    old = dataclasses.replace(HEADER, format_version=1)
    recs = make_records(3)
    with AdapterStore.create(tmp_path / "s", old) as s:
        s.put("docs", recs[:2], dtype="bf16")  # what an old microlora wrote
        assert s.header.format_version == 1
    with AdapterStore(tmp_path / "s") as s:
        assert s.header.format_version == 1  # reading changes nothing
        for want, got in zip(recs, s.get("docs", [r.id for r in recs[:2]])):
            assert torch.equal(got.adapter.flat, want.adapter.flat.bfloat16())
        s.put("docs", recs[2:])  # the default: int8
        assert s.header.format_version == FORMAT_VERSION == 2
    env = lmdb.open(str(tmp_path / "s"), max_dbs=4, readonly=True, lock=False)
    with env.begin(db=env.open_db(b"__meta__", create=False)) as txn:
        assert json.loads(txn.get(b"header"))["format_version"] == 2  # on disk too
    env.close()
    with AdapterStore(tmp_path / "s", readonly=True) as s:
        got = s.get("docs", [r.id for r in recs])
        assert [g.adapter.flat.dtype for g in got] == [torch.bfloat16] * 2 + [torch.float32]


def test_the_store_writes_int8_by_default_and_bf16_when_told(tmp_path):
    assert StoreConfig().adapter_dtype == "int8"
    with pytest.raises(MicroloraError, match="--adapter-dtype"):
        StoreConfig("int4")
    recs = make_records(2)
    with AdapterStore.create(tmp_path / "a", HEADER) as a, \
            AdapterStore.create(tmp_path / "b", HEADER, adapter_dtype="bf16") as b:
        a.put("docs", recs)
        b.put("docs", recs)
        with a.read("docs") as ra, b.read("docs") as rb:
            assert rec.stored_dtype(ra._value(recs[0].id)) == "int8"
            assert rec.stored_dtype(rb._value(recs[0].id)) == "bf16"
            assert len(ra._value(recs[0].id)) < len(rb._value(recs[0].id))


def test_composed_deltas_of_int8_atoms_stay_close_to_the_originals(tmp_path):
    recs = make_records(8, seed=2)
    with AdapterStore.create(tmp_path / "s", HEADER) as s:
        s.put("docs", recs)
        with s.read("docs") as reader:
            stored = [r.adapter for r in reader.gather([r.id for r in recs])]
            composed = compose([stored])  # what the composer builds for one request, k=8
    exact = compose([[r.adapter for r in recs]])
    for name, (A, B) in exact.items():
        want = B[0] @ A[0]  # (out, in): the sum of the 8 atoms' deltas
        got = composed[name][1][0] @ composed[name][0][0]
        assert not torch.equal(got, want)  # it is int8, not a copy
        # int8 per-row error ~ 1/254 of each row's range; summed over 16 rank components
        assert float((got - want).norm() / want.norm()) < 0.01


def test_a_gather_dequantizes_its_atoms_together_as_each_alone(tmp_path):
    recs = make_records(5, seed=6)
    ids = [r.id for r in recs]
    with AdapterStore.create(tmp_path / "s", HEADER) as s:
        s.put("docs", recs)
        with s.read("docs") as reader:
            together = reader.gather([ids[3], ids[0], ids[3], ids[4]], copy=True)  # out of order
            alone = [rec.decode(reader._value(i)) for i in (ids[3], ids[0], ids[3], ids[4])]
    assert [r.id for r in together] == [ids[3], ids[0], ids[3], ids[4]]
    for got, want in zip(together, alone):
        assert torch.equal(got.adapter.flat, want.adapter.flat)
        assert got.text == want.text and np.array_equal(got.embedding, want.embedding)
    # one block holds the fetch: composing it gives what composing separate copies does
    assert together[0].adapter.flat._base is together[1].adapter.flat._base
    copies = [Packed(r.adapter.flat.clone(), r.adapter.layout) for r in together]
    for order in ([0, 1, 2, 3], [1, 0, 3, 2]):  # rows of the block in order, and not
        fast = compose([[together[i].adapter for i in order]], dtype=torch.bfloat16)
        slow = compose([[copies[i] for i in order]], dtype=torch.bfloat16)
        for name, (A, B) in slow.items():
            assert torch.equal(fast[name][0], A) and torch.equal(fast[name][1], B)


def test_compact_reencodes_a_bf16_store_as_int8(tmp_path):
    recs = make_records(30)
    path = tmp_path / "s"
    with AdapterStore.create(path, HEADER, adapter_dtype="bf16") as s:
        s.put("docs", recs)
        index_ids = sorted(s.index("docs").ids)
        gen = s.generation("docs")
    before = (path / "data.mdb").stat().st_size
    result = CliRunner().invoke(cli, ["store", "compact", "--store", str(path),
                                      "--adapter-dtype", "int8"])
    assert result.exit_code == 0, result.output
    assert "re-encoded 30 atoms as int8" in result.output
    assert (path / "data.mdb").stat().st_size < before
    with AdapterStore(path) as s:
        assert s.verify().ok and s.generation("docs") > gen
        assert sorted(s.index("docs").ids) == index_ids
        with s.read("docs") as reader:
            for r in recs:
                assert rec.stored_dtype(reader._value(r.id)) == "int8"
                got = reader.get(r.id)
                assert got.text == r.text
                np.testing.assert_array_equal(got.embedding, r.embedding)
                q, scales = quantize(r.adapter.to(torch.bfloat16))  # the same adapters, int8
                assert torch.equal(got.adapter.flat,
                                   dequantize(q, scales, r.adapter.layout).flat)
        assert s.reencode("int8") == 0  # nothing left to rewrite


def default_shapes() -> dict[str, tuple[int, int]]:
    """(in, out) of the default targets of Gemma 3 270M, from its config (no weights)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from benchmarks.bench_models import GEMMA3_270M
    from microlora.core.targets import linear_features

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Gemma3TextConfig(**GEMMA3_270M))
    return {name: linear_features(m) for name, m in select_targets(model, TargetSpec()).items()}


def test_a_default_atom_takes_half_the_pages_of_bf16(tmp_path):
    shapes = default_shapes()
    assert len(shapes) == 18
    packed = Packed.of(random_adapter(shapes, rank=2, seed=0, scale=0.05))
    assert packed.layout.size == 96_768
    record = dataclasses.replace(make_records(1)[0], adapter=packed)

    def lmdb_bytes(value: bytes) -> int:  # an overflow value: 16-byte page header, 4 KiB pages
        return -(-(len(value) + 16) // 4096) * 4096

    int8, bf16 = rec.encode(record, "int8"), rec.encode(record, "bf16")
    # one byte a value instead of two, less 72 bf16 scales and their ~70 bytes of header
    assert 96_768 - 144 - 128 <= len(bf16) - len(int8) <= 96_768 - 144
    assert lmdb_bytes(int8) == 25 * 4096 == 102_400  # 100,000 needs 24 pages: see RESULTS.md
    assert lmdb_bytes(bf16) == 48 * 4096
    with AdapterStore.create(tmp_path / "s", HEADER) as s:
        s.put("docs", [dataclasses.replace(record, id=f"a{i}") for i in range(20)])
        assert s.stats()[0].bytes_per_atom <= 102_400 + 4096 // 20 * 2  # + leaf and branch pages
