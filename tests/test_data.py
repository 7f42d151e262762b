"""ArrayActivations, check_finite and the massive filter (sae.data)."""

import numpy as np
import pytest
import torch

from sae.data import ActivationSource, ArrayActivations, check_finite, drop_massive, massive_mask


def tagged(n: int, d: int = 4, seed: int = 0) -> np.ndarray:
    """Random float32 rows whose column 0 is the row index (so rows can be identified)."""
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    x[:, 0] = np.arange(n)
    return x


def ids(batches) -> list[list[int]]:
    return [b["activations"][:, 0].long().tolist() for b in batches]


def flat(batch_ids: list[list[int]]) -> list[int]:
    return [i for b in batch_ids for i in b]


@pytest.fixture(params=["numpy", "torch", "npy"])
def make(request, tmp_path):
    """Build an ArrayActivations from numpy, torch or a memory-mapped .npy file."""

    def build(x: np.ndarray, **kw) -> ArrayActivations:
        if request.param == "numpy":
            return ArrayActivations(x, **kw)
        if request.param == "torch":
            return ArrayActivations(torch.from_numpy(x), **kw)
        path = tmp_path / "acts.npy"
        np.save(path, x)
        return ArrayActivations(path, **kw)

    build.kind = request.param
    return build


def test_every_training_row_once_per_epoch(make):
    x = tagged(103)
    chunk = 17 if make.kind == "npy" else None
    src = make(x, batch_size=10, holdout=3, epochs=2, seed=1, chunk_rows=chunk)
    assert isinstance(src, ActivationSource)
    assert len(src) == 10 and src.d_in == 4 and src.hookpoints == ["activations"]
    batches = ids(src)
    assert len(batches) == 20 and all(len(b) == 10 for b in batches)
    for epoch in (batches[:10], batches[10:]):
        assert sorted(flat(epoch)) == list(range(100))  # holdout rows 100..102 never served
    assert flat(batches[:10]) != flat(batches[10:])  # each epoch its own order
    assert src.tokens_seen == 200
    assert ids(src) == batches  # a finished source starts over
    assert src.tokens_seen == 200
    # the rows are served unchanged
    b = next(iter(make(x, batch_size=7, holdout=3, seed=2, chunk_rows=chunk)))["activations"]
    assert b.dtype == torch.float32
    np.testing.assert_array_equal(b.numpy(), x[b[:, 0].long().numpy()])
    np.testing.assert_array_equal(src.heldout().numpy(), x[100:])


def test_drop_last_partial_batch():
    src = ArrayActivations(tagged(25), batch_size=10, seed=0)
    got = ids(src)
    assert len(src) == 2 and [len(b) for b in got] == [10, 10]
    assert len(set(flat(got))) == 20


def test_shuffled_reproducible_and_seeded():
    x = tagged(64)
    a = ids(ArrayActivations(x, batch_size=8, seed=3))
    b = ids(ArrayActivations(x, batch_size=8, seed=3))
    c = ids(ArrayActivations(x, batch_size=8, seed=4))
    assert a == b and a != c
    assert flat(a) != list(range(64))
    assert flat(ids(ArrayActivations(x, batch_size=8, shuffle=False))) == list(range(64))


def test_memmap_chunks_shuffle_within_chunks(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, tagged(40))
    src = ArrayActivations(path, batch_size=10, chunk_rows=10, seed=5, shuffle=True)
    for b in ids(src):  # batches align with 10-row chunks here: each holds one chunk, shuffled
        assert sorted(b) == list(range(min(b), min(b) + 10)) and b != sorted(b)


@pytest.mark.parametrize("k", [3, 9, 10, 13])
def test_resume_gives_identical_rest(make, k):
    x = tagged(57)
    chunk = 8 if make.kind == "npy" else None
    kw = dict(batch_size=6, epochs=3, seed=11, holdout=2, chunk_rows=chunk)
    full = ids(make(x, **kw))
    assert len(full) == 27  # 55 // 6 = 9 per epoch; k=9 resumes exactly at an epoch boundary
    src = make(x, **kw)
    it = iter(src)
    head = ids(next(it) for _ in range(k))
    state = src.state_dict()
    assert src.tokens_seen == 6 * k and state["epoch"] == (k - 1) // 9
    other = make(x, **kw)
    other.load_state_dict(state)
    assert head + ids(other) == full
    assert other.tokens_seen == 6 * 27


def test_load_state_dict_rejects_other_config():
    x = tagged(30)
    state = ArrayActivations(x, batch_size=5, seed=0).state_dict()
    with pytest.raises(ValueError, match=r"seed=0 \(this source has 1\)"):
        ArrayActivations(x, batch_size=5, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        ArrayActivations(x, batch_size=5).load_state_dict({"epoch": 0})


def test_input_dtypes_and_output_dtype():
    x = tagged(12)
    out = next(iter(ArrayActivations(x.astype(np.float64), batch_size=4, dtype=torch.bfloat16)))
    assert out["activations"].dtype == torch.bfloat16
    xf = np.asfortranarray(x)
    assert flat(ids(ArrayActivations(xf, batch_size=4, shuffle=False))) == list(range(12))
    ro = x.copy()
    ro.setflags(write=False)
    assert len(list(ArrayActivations(ro, batch_size=4, hookpoint="h"))) == 3


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"2-D \(rows, d_in\) array, got shape \(5,\)"):
        ArrayActivations(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 4\)"):
        ArrayActivations(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"empty \(shape \(0, 4\)\)"):
        ArrayActivations(np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="must be float16, float32 or float64, got dtype int64"):
        ArrayActivations(np.zeros((4, 4), np.int64))
    with pytest.raises(ValueError, match="must be floating point, got dtype torch.int32"):
        ArrayActivations(torch.zeros(4, 4, dtype=torch.int32))
    missing = tmp_path / "nope.npy"
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        ArrayActivations(missing)
    np.savez(tmp_path / "z.npz", a=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="not a .npy file"):
        ArrayActivations(tmp_path / "z.npz")
    with pytest.raises(TypeError, match="got list"):
        ArrayActivations([[1.0, 2.0]])
    with pytest.raises(ValueError, match="holdout=10 leaves no training rows: .* only 10 rows"):
        ArrayActivations(tagged(10), holdout=10)
    with pytest.raises(ValueError, match="fewer than batch_size=8"):
        ArrayActivations(tagged(10), holdout=3, batch_size=8)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        ArrayActivations(tagged(10), batch_size=0)


def test_nonfinite_named_in_memory_up_front():
    x = tagged(50)
    x[37, 2] = np.nan
    with pytest.raises(ValueError, match=r"non-finite value \(nan\) at row 37, column 2"):
        ArrayActivations(x, batch_size=5)
    t = torch.from_numpy(tagged(50))
    t[49, 3] = float("-inf")  # in the holdout: still refused
    with pytest.raises(ValueError, match=r"\(-inf\) at row 49, column 3"):
        ArrayActivations(t, batch_size=5, holdout=5)


def test_nonfinite_in_file_found_when_its_chunk_is_read(tmp_path):
    x = tagged(60)
    x[45, 1] = np.inf
    path = tmp_path / "bad.npy"
    np.save(path, x)
    src = ArrayActivations(path, batch_size=5, chunk_rows=10, shuffle=False)  # lazily checked
    it = iter(src)
    assert len([next(it) for _ in range(8)]) == 8  # rows 0..39 are fine
    with pytest.raises(ValueError, match=rf"activations in {path} hold .* \(inf\) at row 45, col"):
        next(it)
    y = tagged(60)
    y[58, 0] = np.nan
    np.save(path, y)
    src = ArrayActivations(path, batch_size=5, holdout=5, chunk_rows=10)
    assert len(list(src)) == 11
    with pytest.raises(ValueError, match="at row 58, column 0"):
        src.heldout()


def test_check_finite_messages():
    check_finite(torch.zeros(3, 3))
    check_finite(np.arange(6).reshape(2, 3))  # integers are always finite
    check_finite(torch.full((10, 3), 3e38))  # the sum overflows, every value is finite
    big = torch.full((10, 3), 3e38)
    big[6, 2] = float("nan")
    with pytest.raises(ValueError, match=r"\(nan\) at row 6, column 2"):
        check_finite(big)
    with pytest.raises(ValueError, match=r"^batch hold a non-finite value \(nan\) at row 7, "):
        x = np.zeros((4, 2))
        x[2, 1] = np.nan
        check_finite(x, "batch", row_offset=5)
    with pytest.raises(ValueError, match=r"at row 1$"):
        check_finite(torch.tensor([0.0, float("inf")]))


def test_massive_rows_dropped(make):
    x = tagged(40, d=6)
    x[:, 1:] += 3.0  # row norms ~ sqrt(5 * 10): the massive rows are 1000x that
    big = [5, 17, 33, 38]
    x[big, 1:] *= 1000.0
    chunk = 20 if make.kind == "npy" else None
    src = make(x, batch_size=4, holdout=5, massive_factor=10.0, chunk_rows=chunk)
    assert src.kept_rows() == 32 and len(src) == 8
    served = sorted(flat(ids(src)))
    assert served == [i for i in range(35) if i not in big]
    held = src.heldout()[:, 0].long().tolist()
    assert held == [35, 36, 37, 39]
    median = src.massive_median["activations"]
    ref = np.median(np.linalg.norm(x[: src.chunk_rows], axis=1))
    assert median == pytest.approx(ref, rel=0.05)
    with pytest.raises(ValueError, match="massive_factor must be > 0"):
        make(x, massive_factor=0.0)
    with pytest.raises(ValueError, match="median row norm of the first 40 rows is 0"):
        ArrayActivations(np.zeros((40, 3), np.float32), batch_size=4, massive_factor=10.0)


def test_massive_mask_matches_drop_massive():
    x = torch.randn(50, 8)
    x[[3, 9]] *= 100
    kept, mask = drop_massive(x, 10.0)
    assert torch.equal(mask, massive_mask(x, 10.0)) and mask.sum() == 48
    assert torch.equal(kept, x[mask])
    assert massive_mask(x, 10.0, median=1e9).all()
