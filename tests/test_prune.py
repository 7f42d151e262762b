"""Pruning: layer methods against references, N:M, sparsity, the model driver, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sparsecode.hooks import capture
from sparsecode.prune import (
    evaluate_perplexity,
    iht_prune,
    layer_error,
    omp_prune,
    owl_sparsities,
    prune,
    prune_layer,
    save_pruned,
    semi_structured_available,
    sparsegpt,
    to_semi_structured,
    wanda,
)


def make_layer(out=24, d=32, n=400, seed=0, outliers=True):
    """A weight and the Gram of correlated inputs with a few large-norm columns (like LLMs)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / math.sqrt(d) + torch.eye(d)
    X = mix @ torch.randn(d, n, generator=g)
    if outliers:
        X[:3] *= 10.0
    W = torch.randn(out, d, generator=g)
    return W, X @ X.T, X


# ------------------------------------------------------------------------------- layer methods


@pytest.mark.parametrize("pattern", [None, "2:4", "4:8"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iht_never_worse_than_wanda_per_row(pattern, seed):
    W, H, _ = make_layer(seed=seed)
    W_w, _ = wanda(W, H, 0.5, None if pattern is None else tuple(map(int, pattern.split(":"))))
    W_i, keep = prune_layer(W, H, 0.5, "iht", pattern)
    e_w, e_i = layer_error(W, W_w, H), layer_error(W, W_i, H)
    assert (e_i <= e_w * (1 + 1e-5) + 1e-6).all()
    assert e_i.sum() < 0.7 * e_w.sum()  # the weight update is worth a lot
    assert torch.equal(W_i != 0, keep)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_iht_started_from_both_masks_beats_both(nm):
    W, H, _ = make_layer(seed=5)
    W_w, _ = wanda(W, H, 0.5, nm)
    W_s, _ = sparsegpt(W, H, 0.5, nm, per_row=True)
    W_i, keep = iht_prune(W, H, 0.5, nm, init=("wanda", "sparsegpt"))
    e_i = layer_error(W, W_i, H)
    assert (e_i <= layer_error(W, W_w, H) * (1 + 1e-5) + 1e-6).all()
    assert (e_i <= layer_error(W, W_s, H) * (1 + 1e-4) + 1e-5).all()
    assert ((~keep).sum(1) == 16).all()
    with pytest.raises(ValueError, match="init"):
        iht_prune(W, H, 0.5, init="obs")


def test_iht_matches_exact_least_squares_on_its_support():
    W, H, _ = make_layer(out=6, d=16, outliers=False)
    W_i, keep = iht_prune(W.double(), H.double(), 0.5, cg_iter=200, ridge=0.0)
    for r in range(W.shape[0]):
        S = keep[r].nonzero().squeeze(1)
        Hd = H.double()
        exact = torch.linalg.solve(Hd[S][:, S], (Hd @ W[r].double())[S])
        torch.testing.assert_close(W_i[r, S].double(), exact, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_omp_never_worse_than_wanda_and_least_squares_on_its_support(seed):
    W, H, _ = make_layer(out=12, d=32, seed=seed)
    W_w, _ = wanda(W, H, 0.5)
    W_o, keep = prune_layer(W.double(), H.double(), 0.5, "omp")
    e_w, e_o = layer_error(W.double(), W_w.double(), H.double()), layer_error(
        W.double(), W_o, H.double())
    assert (e_o <= e_w * (1 + 1e-9)).all()
    assert e_o.sum() < 0.7 * e_w.sum()
    Hd = H.double()
    for r in range(W.shape[0]):  # the kept weights solve the least squares on the support
        S = keep[r].nonzero().squeeze(1)
        exact = torch.linalg.solve(Hd[S][:, S], (Hd @ W[r].double())[S])
        torch.testing.assert_close(W_o[r, S], exact, rtol=1e-6, atol=1e-8)


def test_omp_selection_matches_a_greedy_reference_on_a_tiny_layer():
    """ORMP: each step adds the input whose least-squares refit has the smallest error."""
    W, H, _ = make_layer(out=3, d=10, seed=4)
    W, H = W.double(), H.double()
    _, keep = omp_prune(W, H, 0.6)
    for r in range(W.shape[0]):
        S: list[int] = []
        for _ in range(4):
            best = None
            for j in range(10):
                if j in S:
                    continue
                T = [*S, j]
                w = torch.linalg.solve(H[T][:, T], (H @ W[r])[T])
                full = torch.zeros(10, dtype=H.dtype)
                full[T] = w
                e = float((W[r] - full) @ H @ (W[r] - full))
                if best is None or e < best[0]:
                    best = (e, j)
            S.append(best[1])
        wanda_keep = wanda(W, H, 0.6)[1][r]
        assert set(keep[r].nonzero().squeeze(1).tolist()) in (set(S),
                                                               set(wanda_keep.nonzero()
                                                                   .squeeze(1).tolist()))
    with pytest.raises(ValueError, match="unstructured sparsity only"):
        omp_prune(W, H, 0.5, (2, 4))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "iht"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_nm_masks_are_exactly_n_of_m(method, nm):
    W, H, _ = make_layer()
    W2, keep = prune_layer(W, H, method=method, pattern=nm)
    groups = keep.reshape(W.shape[0], -1, nm[1]).sum(-1)
    assert (groups == nm[0]).all()
    assert ((W2 != 0) <= keep).all()
    assert ((W2.reshape(W.shape[0], -1, nm[1]) != 0).sum(-1) <= nm[0]).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "iht", "omp"])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7])
def test_achieved_sparsity_equals_request(method, sparsity):
    W, H, _ = make_layer(out=16, d=32)
    W2, keep = prune_layer(W, H, sparsity, method, blocksize=16) if method == "sparsegpt" \
        else prune_layer(W, H, sparsity, method)
    if method in ("wanda", "iht", "omp"):  # per output row
        assert ((~keep).sum(1) == round(sparsity * W.shape[1])).all()
        expected = W.shape[0] * round(sparsity * W.shape[1])
    elif method == "sparsegpt":  # per block of 16 columns
        expected = 2 * round(sparsity * W.shape[0] * 16)
    else:
        expected = round(sparsity * W.numel())
    assert int((~keep).sum()) == expected == int((W2 == 0).sum())
    assert abs(expected / W.numel() - sparsity) <= 0.5 / W.shape[1]


def brute_force_obs(W, H, sparsity, blocksize, percdamp=0.01, nm=None):
    """Sequential OBS in float64 with explicit inverses of the remaining Hessian (no Cholesky
    trick, no lazy block updates), with SparseGPT's mask selection rule."""
    W, H = W.double().clone(), H.double().clone()
    d = H.shape[0]
    H += percdamp * torch.diagonal(H).mean() * torch.eye(d, dtype=H.dtype)
    inv_diag = torch.tensor([torch.linalg.inv(H[j:, j:])[0, 0] for j in range(d)], dtype=H.dtype)
    prune_mask = torch.zeros_like(W, dtype=torch.bool)
    for j in range(d):
        if nm is None and j % blocksize == 0:
            b = slice(j, min(j + blocksize, d))
            score = (W[:, b] ** 2 / inv_diag[b]).reshape(-1)
            n_prune = round(sparsity * score.numel())
            idx = score.argsort()[:n_prune]
            pm = torch.zeros_like(score, dtype=torch.bool)
            pm[idx] = True
            prune_mask[:, b] = pm.reshape(W.shape[0], -1)
        if nm is not None and j % nm[1] == 0:
            b = slice(j, j + nm[1])
            score = W[:, b] ** 2 / inv_diag[b]
            idx = score.argsort(dim=1)[:, : nm[1] - nm[0]]
            prune_mask[:, b] = torch.zeros_like(score, dtype=torch.bool).scatter(1, idx, True)
        Hinv = torch.linalg.inv(H[j:, j:])
        rows = prune_mask[:, j]
        W[rows, j:] -= (W[rows, j] / Hinv[0, 0])[:, None] * Hinv[0][None, :]
        W[rows, j] = 0.0
    return W, ~prune_mask


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_equals_brute_force_obs(nm):
    W, H, _ = make_layer(out=5, d=12, n=200, outliers=False)
    W_s, keep = sparsegpt(W.double(), H.double(), 0.5, nm, blocksize=4)
    W_b, keep_b = brute_force_obs(W, H, 0.5, 4, nm=nm)
    assert torch.equal(keep, keep_b)
    torch.testing.assert_close(W_s, W_b, rtol=1e-9, atol=1e-9)


def test_sparsegpt_beats_wanda_and_magnitude_on_layer_error():
    W, H, _ = make_layer()
    e = {m: float(layer_error(W, prune_layer(W, H, 0.5, m)[0], H).sum())
         for m in ("magnitude", "wanda", "sparsegpt", "iht")}
    assert e["sparsegpt"] < e["wanda"] < e["magnitude"]
    assert e["iht"] < e["wanda"]


def test_layer_bad_input():
    W, H, _ = make_layer(out=4, d=12)
    for bad in (1.0, -0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="sparsity"):
            prune_layer(W, H, bad)
    for bad in ("4:4", "5:4", (0, 4), "2-4", "a:b"):
        with pytest.raises(ValueError, match="pattern|N:M"):
            prune_layer(W, H, pattern=bad)
    with pytest.raises(ValueError, match="my.layer.*12.*not divisible by M=8"):
        prune_layer(W, H, pattern="2:8", name="my.layer")
    with pytest.raises(ValueError, match="unknown method"):
        prune_layer(W, H, method="obs")
    with pytest.raises(ValueError, match="do not match"):
        prune_layer(W, H[:5, :5])


# ------------------------------------------------------------------------------- model driver


@pytest.fixture()
def llama(tiny_llama):
    return copy.deepcopy(tiny_llama)


def calib(n=6, T=16, seed=0):
    return torch.randint(0, 128, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "iht", "omp"])
def test_prune_model_sparsity_report_and_masks(llama, method):
    rep = prune(llama, calib(), 0.5, method, batch_size=4, return_masks=True)
    assert len(rep.layers) == 3 * 7
    assert rep.sparsity == pytest.approx(0.5)
    mods = dict(llama.named_modules())
    for r in rep.layers:
        w = mods[r.name].weight
        assert r.sparsity == pytest.approx(0.5)
        assert float((w == 0).float().mean()) == pytest.approx(0.5)
        assert torch.equal(rep.masks[r.name], w != 0)
        if method == "magnitude":  # no calibration forwards: the error is not measured
            assert math.isnan(r.error)
        else:
            assert 0 <= r.error < 1.5
        assert r.seconds >= 0
    assert rep.calibration_tokens == 6 * 16
    assert rep.to_dict()["achieved_sparsity"] == pytest.approx(0.5)


def test_prune_model_nm_and_targets(llama):
    rep = prune(llama, calib(), method="iht", pattern="2:4", targets="mlp.*")
    assert {r.name.split(".")[-1] for r in rep.layers} == {"gate_proj", "up_proj", "down_proj"}
    w = llama.model.layers[1].mlp.down_proj.weight
    assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    assert (llama.model.layers[1].self_attn.q_proj.weight != 0).all()


def test_blocks_are_calibrated_on_pruned_outputs(tiny_llama):
    dense = copy.deepcopy(tiny_llama)
    model = copy.deepcopy(tiny_llama)
    ids = calib()
    rep = prune(model, ids, 0.5, "wanda", return_masks=True)
    # block 1's q_proj inputs in the pruned model do not depend on block 1's own weights
    with capture(model, "model.layers.1.self_attn.q_proj", inputs=True) as acts:
        model(input_ids=ids, use_cache=False)
    X = acts["model.layers.1.self_attn.q_proj"].reshape(-1, 32)
    W = dense.model.layers[1].self_attn.q_proj.weight
    _, keep = wanda(W, X.T @ X, 0.5)
    assert torch.equal(keep, rep.masks["model.layers.1.self_attn.q_proj"])
    with capture(dense, "model.layers.1.self_attn.q_proj", inputs=True) as acts:
        dense(input_ids=ids, use_cache=False)
    Xd = acts["model.layers.1.self_attn.q_proj"].reshape(-1, 32)
    assert not torch.allclose(X, Xd)


def test_owl_allocation(llama):
    s = owl_sparsities([[torch.rand(8, 8)], [torch.rand(8, 8) ** 8], [torch.rand(8, 8) ** 3]], 0.7)
    assert sum(s) / 3 == pytest.approx(0.7) and max(s) - min(s) == pytest.approx(0.16)
    rep = prune(llama, calib(), 0.7, "wanda", allocation="owl", owl_lambda=0.05)
    targets = sorted({r.target for r in rep.layers})
    assert len(targets) == 3 and sum(targets) / 3 == pytest.approx(0.7)
    assert rep.sparsity == pytest.approx(0.7, abs=0.01)
    for r in rep.layers:
        assert r.sparsity == pytest.approx(r.target, abs=1 / 32)


def test_prune_model_bad_input(llama):
    with pytest.raises(ValueError, match="empty"):
        prune(llama, torch.zeros(0, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        prune(llama, [])
    with pytest.raises(ValueError, match="sparsity"):
        prune(llama, calib(), 1.0)
    with pytest.raises(ValueError, match="N < M"):
        prune(llama, calib(), pattern="4:4")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*32.*M=5"):
        prune(llama, calib(), pattern="2:5")
    with pytest.raises(ValueError, match="fixes the sparsity"):
        prune(llama, calib(), 0.7, pattern="2:4")
    with pytest.raises(ValueError, match="owl"):
        prune(llama, calib(), pattern="2:4", allocation="owl")
    with pytest.raises(ValueError, match="allocation"):
        prune(llama, calib(), allocation="global")
    with pytest.raises(ValueError, match="unknown method"):
        prune(llama, calib(), method="obs")
    assert (llama.model.layers[0].mlp.up_proj.weight != 0).all()  # nothing was touched


def test_perplexity_matches_hf_loss_and_pruning_raises_it(llama):
    ids = calib(4, 16, seed=1)
    ppl = evaluate_perplexity(llama, ids, batch_size=3)
    loss = llama(input_ids=ids, labels=ids).loss
    assert ppl == pytest.approx(math.exp(float(loss)), rel=1e-5)
    with pytest.raises(ValueError, match="tokens"):
        evaluate_perplexity(llama, ids[:, :1])


def test_save_pruned_round_trip(llama, tmp_path):
    from safetensors.torch import load_file

    rep = prune(llama, calib(), 0.5, "wanda", return_masks=True)
    path = save_pruned(llama, tmp_path / "pruned.safetensors", rep.masks)
    state = load_file(str(path))
    w = state["model.layers.2.mlp.down_proj.weight"]
    assert torch.equal(w, llama.model.layers[2].mlp.down_proj.weight)
    masks = load_file(str(tmp_path / "pruned.masks.safetensors"))
    assert torch.equal(masks["model.layers.2.mlp.down_proj"].bool(), w != 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_semi_structured_says_unavailable_without_cuda(llama):
    ok, why = semi_structured_available()
    assert not ok and "unavailable" in why and "CUDA" in why
    with pytest.raises(RuntimeError, match="unavailable"):
        to_semi_structured(llama, ["model.layers.0.mlp.up_proj"])
