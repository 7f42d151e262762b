"""The on-disk activation cache (sae.cache): writing, resuming, verifying, reading."""

import hashlib
import json

import numpy as np
import pytest
import torch

from sae.cache import CachedActivations, read_manifest, verify_cache, write_cache
from sae.data import ActivationSource, ArrayActivations

D = {"a": 6, "b": 3}


def stream(n: int = 350, batch: int = 40, seed: int = 0):
    """A deterministic batch stream at two aligned hook points; row ids in column 0 of both."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, D["a"], generator=g)
    a[:, 0] = torch.arange(n)
    b = torch.randn(n, D["b"], generator=g)
    b[:, 0] = torch.arange(n)
    return [{"a": a[i : i + batch], "b": b[i : i + batch]} for i in range(0, n, batch)], a, b


def shard_bytes(d) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*.safetensors"))}


class Killed(RuntimeError):
    pass


def killing(batches, after: int):
    """Yield ``after`` batches, then die like a killed writer."""
    for i, b in enumerate(batches):
        if i == after:
            raise Killed
        yield b


class KillingSource:
    """An ActivationSource wrapper that dies after ``after`` batches and counts what it served."""

    def __init__(self, src, after=None):
        self.src, self.after, self.served = src, after, 0
        self.hookpoints = src.hookpoints

    def __iter__(self):
        for b in self.src:
            if self.served == self.after:
                raise Killed
            self.served += 1
            yield b

    def state_dict(self):
        return self.src.state_dict()

    def load_state_dict(self, state):
        self.src.load_state_dict(state)


def test_round_trip_bit_exact_and_manifest(tmp_path):
    batches, a, b = stream()
    meta = {"model": "toy", "context_size": 128, "hooks": {"a": "resid", "b": "mlp"}}
    out = write_cache(batches, tmp_path / "c", shard_tokens=100, metadata=meta, progress=False)
    m = read_manifest(out)
    assert m["complete"] is True and m["format_version"] == 1
    assert m["hookpoints"] == ["a", "b"] and m["d_in"] == D and m["dtype"] == "float32"
    assert m["total_rows"] == 350 and [s["rows"] for s in m["shards"]] == [100, 100, 100, 50]
    assert m["metadata"] == meta and m["shard_tokens"] == 100
    for i, s in enumerate(m["shards"]):
        for hp in D:
            f = s["files"][hp]
            assert f["path"] == f"{hp}/shard_{i:05d}.safetensors"
            data = (out / f["path"]).read_bytes()
            assert f["sha256"] == hashlib.sha256(data).hexdigest() and f["bytes"] == len(data)
    assert not list(out.rglob("*.tmp"))
    verify_cache(out)
    src = CachedActivations(out, batch_size=50, shuffle=False)
    assert isinstance(src, ActivationSource) and len(src) == 7
    got = list(src)
    assert torch.equal(torch.cat([g["a"] for g in got]), a)  # bit-exact, in order
    assert torch.equal(torch.cat([g["b"] for g in got]), b)


def test_bfloat16_stored_and_reread_exactly(tmp_path):
    batches, a, _ = stream(n=64, batch=16)
    out = write_cache(
        [{"a": x["a"]} for x in batches], tmp_path / "c", dtype=torch.bfloat16, progress=False
    )
    assert read_manifest(out)["dtype"] == "bfloat16"
    rows = list(CachedActivations(out, batch_size=16, shuffle=False, dtype=torch.bfloat16))
    back = torch.cat([r["a"] for r in rows])
    assert back.dtype == torch.bfloat16 and torch.equal(back, a.to(torch.bfloat16))
    as32 = torch.cat([r["a"] for r in CachedActivations(out, batch_size=16, shuffle=False)])
    assert torch.equal(as32, a.to(torch.bfloat16).float())


def test_float16_overflow_and_nonfinite_named(tmp_path):
    x = torch.ones(10, 4)
    x[7, 2] = 1e6
    with pytest.raises(ValueError, match=r"at row 7, column 2: .* float16 range"):
        write_cache([{"h": x}], tmp_path / "f16", dtype=torch.float16, progress=False)
    y = torch.ones(10, 4)
    y[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"hook point 'h' hold .* \(nan\) at row 13, column 1"):
        write_cache([{"h": torch.ones(10, 4)}, {"h": y}], tmp_path / "nan", progress=False)
    with pytest.raises(ValueError, match="cache dtype must be one of"):
        write_cache([{"h": x}], tmp_path / "i", dtype=torch.int8, progress=False)


def test_bad_batches(tmp_path):
    q = {"progress": False}
    with pytest.raises(ValueError, match="same rows"):
        write_cache([{"a": torch.ones(4, 2), "b": torch.ones(5, 2)}], tmp_path / "1", **q)
    with pytest.raises(ValueError, match="d_in=3, the cache .* d_in=2"):
        write_cache([{"a": torch.ones(4, 2)}, {"a": torch.ones(4, 3)}], tmp_path / "2", **q)
    with pytest.raises(ValueError, match=r"hook points \['b'\], the cache .* has \['a'\]"):
        write_cache([{"a": torch.ones(4, 2)}, {"b": torch.ones(4, 2)}], tmp_path / "3", **q)
    with pytest.raises(ValueError, match="cannot name a cache directory"):
        write_cache([{"x/y": torch.ones(4, 2)}], tmp_path / "4", **q)
    with pytest.raises(ValueError, match="yielded no batches"):
        write_cache([], tmp_path / "5", progress=False)


def test_total_tokens_truncates(tmp_path):
    batches, a, _ = stream()
    out = write_cache(batches, tmp_path / "c", shard_tokens=64, total_tokens=130, progress=False)
    m = read_manifest(out)
    assert m["total_rows"] == 130 and [s["rows"] for s in m["shards"]] == [64, 64, 2]
    got = torch.cat([r["a"] for r in CachedActivations(out, batch_size=10, shuffle=False)])
    assert torch.equal(got, a[:130])
    with pytest.warns(UserWarning, match="ended after 350 rows, before total_tokens=400"):
        write_cache(batches, tmp_path / "d", total_tokens=400, progress=False)
    part = tmp_path / "e"
    with pytest.raises(Killed):
        write_cache(killing(batches, 2), part, shard_tokens=64, total_tokens=130, progress=False)
    write_cache(batches, part, shard_tokens=64, progress=False)  # keeps total_tokens=130
    assert shard_bytes(part) == shard_bytes(out)


def test_checksum_detects_flipped_byte(tmp_path):
    batches, _, _ = stream()
    out = write_cache(batches, tmp_path / "c", shard_tokens=100, progress=False)
    victim = out / "b" / "shard_00002.safetensors"
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard b/shard_00002.safetensors has sha256"):
        verify_cache(out)
    src = CachedActivations(out, batch_size=50, verify=True, shuffle=False)
    with pytest.raises(ValueError, match="shard b/shard_00002.safetensors of the cache .* corrupt"):
        list(src)
    assert len(list(CachedActivations(out, batch_size=50, shuffle=False))) == 7  # unchecked
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="shard_00002.safetensors is missing"):
        verify_cache(out)


def test_kill_then_resume_is_identical_plain_iterator(tmp_path):
    batches, _, _ = stream()
    ref = write_cache(batches, tmp_path / "ref", shard_tokens=100, progress=False)
    out = tmp_path / "c"
    with pytest.raises(Killed):  # 7 batches of 40 = 280 rows = 2.8 shards: 2 shards listed
        write_cache(killing(batches, 7), out, shard_tokens=100, progress=False)
    m = read_manifest(out)
    assert m["complete"] is False and len(m["shards"]) == 2 and m["total_rows"] == 200
    # debris of a writer killed mid-shard: a temporary file and an unlisted shard
    (out / "a" / ".shard_00002.safetensors.tmp").write_bytes(b"half a shard")
    (out / "b" / "shard_00002.safetensors").write_bytes(b"never listed")
    with pytest.raises(FileExistsError, match="incomplete activation cache"):
        write_cache(batches, out, shard_tokens=100, resume=False, progress=False)
    with pytest.raises(ValueError, match="written with shard_tokens=100"):
        write_cache(batches, out, shard_tokens=64, progress=False)
    with pytest.raises(ValueError, match="written with dtype='float32'"):
        write_cache(batches, out, shard_tokens=100, dtype=torch.bfloat16, progress=False)
    with pytest.raises(ValueError, match="d_in=6"):
        write_cache(
            [{"a": torch.ones(4, 5), "b": torch.ones(4, 3)}], out, shard_tokens=100, progress=False
        )
    write_cache(batches, out, shard_tokens=100, progress=False)
    assert shard_bytes(out) == shard_bytes(ref)
    assert read_manifest(out) == read_manifest(ref)
    verify_cache(out)
    with pytest.raises(FileExistsError, match=r"complete activation cache \(350 rows\)"):
        write_cache(batches, out, shard_tokens=100, progress=False)


def test_kill_then_resume_restores_source_state(tmp_path):
    x = np.random.default_rng(0).standard_normal((530, 5)).astype(np.float32)

    def source(after=None):
        return KillingSource(ArrayActivations(x, batch_size=30, seed=7), after)

    ref = write_cache(source(), tmp_path / "ref", shard_tokens=64, progress=False)
    out = tmp_path / "c"
    with pytest.raises(Killed):  # 5 batches of 30 = 150 rows: 2 shards of 64 listed
        write_cache(source(after=5), out, shard_tokens=64, progress=False)
    rec = read_manifest(out)["shards"][-1]["resume"]
    assert rec["rows_at_state"] == 120 and rec["state"]["offset"] == 120  # boundary 128 mid-batch
    resumed = source()
    write_cache(resumed, out, shard_tokens=64, progress=False)
    assert resumed.served == 17 - 4  # restarted at batch 5 (rows 120..149), not from the start
    assert shard_bytes(out) == shard_bytes(ref)
    assert read_manifest(out) == read_manifest(ref)


class TensorStateSource(KillingSource):
    def state_dict(self):
        return {"inner": self.src.state_dict(), "rng": torch.zeros(2)}


def test_unserialisable_state_falls_back_to_skipping(tmp_path):
    x = np.random.default_rng(1).standard_normal((200, 3)).astype(np.float32)
    # (the one write with its progress bar on)
    ref = write_cache(ArrayActivations(x, batch_size=20), tmp_path / "ref", shard_tokens=50)
    out = tmp_path / "c"
    with pytest.warns(UserWarning, match="not JSON-serialisable"), pytest.raises(Killed):
        src = TensorStateSource(ArrayActivations(x, batch_size=20), after=6)
        write_cache(src, out, shard_tokens=50, progress=False)
    assert read_manifest(out)["shards"][-1]["resume"] is None
    resumed = TensorStateSource(ArrayActivations(x, batch_size=20))
    with pytest.warns(UserWarning, match="not JSON-serialisable"):
        write_cache(resumed, out, shard_tokens=50, progress=False)
    assert resumed.served == 10  # re-read from the start
    assert shard_bytes(out) == shard_bytes(ref)


def test_resume_rewrites_from_a_damaged_shard(tmp_path):
    batches, _, _ = stream()
    ref = write_cache(batches, tmp_path / "ref", shard_tokens=50, progress=False)
    out = tmp_path / "c"
    with pytest.raises(Killed):
        write_cache(killing(batches, 6), out, shard_tokens=50, progress=False)
    victim = out / "a" / "shard_00001.safetensors"
    victim.write_bytes(victim.read_bytes()[:-3] + b"xyz")
    with pytest.warns(UserWarning, match="shard a/shard_00001.safetensors has sha256"):
        write_cache(batches, out, shard_tokens=50, progress=False)
    assert shard_bytes(out) == shard_bytes(ref)


def test_resume_refuses_a_different_source(tmp_path):
    batches, _, _ = stream()
    out = tmp_path / "c"
    with pytest.raises(Killed):
        write_cache(killing(batches, 6), out, shard_tokens=100, progress=False)
    with pytest.raises(ValueError, match="ended after 80 rows but the cache .* already holds 200"):
        write_cache(batches[:2], out, shard_tokens=100, progress=False)


def test_overwrite_and_foreign_directory(tmp_path):
    batches, a, _ = stream()
    out = write_cache(batches, tmp_path / "c", shard_tokens=100, progress=False)
    small = [{"a": a[:30], "b": torch.zeros(30, 3)}]
    write_cache(small, out, shard_tokens=100, overwrite=True, progress=False)
    assert read_manifest(out)["total_rows"] == 30
    assert sorted(shard_bytes(out)) == ["a/shard_00000.safetensors", "b/shard_00000.safetensors"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and holds no manifest.json"):
        write_cache(small, other, progress=False)


def test_cached_rows_are_the_written_rows_and_aligned(tmp_path):
    batches, a, b = stream()
    out = write_cache(batches, tmp_path / "c", shard_tokens=60, progress=False)
    src = CachedActivations(out, batch_size=25, holdout=20, seed=3, epochs=2, window_shards=2)
    assert len(src) == 13 and src.d_in == D and src.hookpoints == ["a", "b"]
    got = list(src)
    assert len(got) == 26
    for g in got:  # same token positions at both hook points
        ids = g["a"][:, 0].long()
        assert torch.equal(g["b"][:, 0].long(), ids)
        assert torch.equal(g["a"], a[ids]) and torch.equal(g["b"], b[ids])
    for epoch in (got[:13], got[13:]):
        ids = torch.cat([g["a"][:, 0] for g in epoch]).long()
        assert len(set(ids.tolist())) == 325 and int(ids.max()) < 330  # a subset, no repeats
    full = CachedActivations(out, batch_size=10, holdout=20, seed=3)  # 330 rows: none dropped
    rows = torch.cat([g["a"] for g in full])
    assert torch.equal(rows[rows[:, 0].argsort()], a[:330])  # the written rows, as a multiset
    assert rows[:, 0].tolist() != sorted(rows[:, 0].tolist())
    held = full.heldout()
    assert torch.equal(held["a"], a[330:]) and torch.equal(held["b"], b[330:])
    only_b = CachedActivations(out, batch_size=10, hookpoints="b")
    assert next(iter(only_b)).keys() == {"b"}
    with pytest.raises(ValueError, match=r"not there: \['c'\]"):
        CachedActivations(out, hookpoints=["c"])
    with pytest.raises(ValueError, match="holdout=350 leaves no training rows"):
        CachedActivations(out, holdout=350)


@pytest.mark.parametrize("k", [4, 13, 17])
def test_cached_resume_identical(tmp_path, k):
    batches, _, _ = stream()
    out = write_cache(batches, tmp_path / "c", shard_tokens=60, progress=False)
    kw = dict(batch_size=25, epochs=2, seed=9, holdout=7)
    full = [g["a"] for g in CachedActivations(out, **kw)]
    src = CachedActivations(out, **kw)
    it = iter(src)
    head = [next(it)["a"] for _ in range(k)]
    state = json.loads(json.dumps(src.state_dict()))  # states survive JSON
    other = CachedActivations(out, **kw)
    other.load_state_dict(state)
    rest = [g["a"] for g in other]
    assert len(head) + len(rest) == len(full) == 26
    assert all(torch.equal(x, y) for x, y in zip(head + rest, full, strict=True))


def test_cached_incomplete_and_massive(tmp_path):
    batches, a, _ = stream()
    out = tmp_path / "c"
    with pytest.raises(Killed):
        write_cache(killing(batches, 4), out, shard_tokens=50, progress=False)
    with pytest.raises(ValueError, match="incomplete .* resume=True"):
        CachedActivations(out)
    part = CachedActivations(out, batch_size=10, allow_incomplete=True, shuffle=False)
    assert torch.equal(torch.cat([g["a"] for g in part]), a[:150])
    x = torch.randn(200, 4) + 3
    x[:, 0] = torch.arange(200)
    x[[10, 120], 1:] *= 1e4
    big = write_cache([{"h": x}], tmp_path / "m", shard_tokens=64, progress=False)
    src = CachedActivations(big, batch_size=6, massive_factor=10.0, holdout=8)
    assert src.kept_rows() == 190 and len(src) == 31
    served = torch.cat([g["h"][:, 0] for g in src]).long().tolist()
    assert 10 not in served and 120 not in served and len(set(served)) == 186


def test_missing_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="no activation cache at"):
        CachedActivations(tmp_path / "none")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        verify_cache(tmp_path)
