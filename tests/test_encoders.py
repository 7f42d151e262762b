"""Pursuit encoders on an SAE's decoder (sae.encoders) against the core's solvers."""

import numpy as np
import pytest
import torch

from sae.encoders import ENCODERS, Encoded, encode_pairs
from sae.metrics import evaluate
from sae.models import SAE, SAEConfig
from sparsecode.core import LeastSquares, fista, mp, nnomp, omp
from sparsecode.core.operators import L1


def _sae(scale=1.0):
    sae = SAE(SAEConfig(d_in=12, d_sae=48, k=4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        sae.W_dec.mul_(scale)
    return sae.double().eval()


def _x():
    return torch.randn(30, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("encoder", ["mp", "omp", "ormp", "nnomp", "fista"])
def test_pursuit_encoders_are_the_core_solvers_on_the_normalised_decoder(encoder):
    """Non-unit decoder rows (norm 0.25): the solver codes against the normalised rows, the
    latents are its codes divided by the norms, so decoding reproduces the solver's fit."""
    sae, x = _sae(scale=0.25), _x()
    D = sae.W_dec.detach() / 0.25
    prob = LeastSquares.from_data(x - sae.b_dec.detach(), D)
    want = {
        "mp": lambda: mp(prob, n_nonzero_coefs=4, positive=True).codes.to_dense(),
        "omp": lambda: omp(prob, n_nonzero_coefs=4).codes.to_dense(),
        "ormp": lambda: omp(prob, n_nonzero_coefs=4, selection="ormp").codes.to_dense(),
        "nnomp": lambda: nnomp(prob, n_nonzero_coefs=4).codes.to_dense(),
        "fista": lambda: fista(prob, L1(0.05, positive=True), tol=1e-6, max_iter=2000).codes,
    }[encoder]() / 0.25
    with pytest.warns(UserWarning, match="not unit-norm"):
        kw = {"alpha": 0.05} if encoder == "fista" else {"k": 4}
        rows, cols, vals = encode_pairs(sae, x, encoder, **kw)
    got = torch.zeros(30, 48, dtype=torch.float64).index_put((rows, cols), vals)
    tol = {"atol": 1e-5, "rtol": 1e-5} if encoder == "fista" else {}  # FISTA's own tolerance
    torch.testing.assert_close(got, want, **tol)
    assert (rows.diff() >= 0).all()
    torch.testing.assert_close(sae.decode(got), want @ sae.W_dec + sae.b_dec)


def test_the_cached_dictionary_follows_the_decoder():
    """The unit atoms and their Gram matrix are computed once per decoder state: an in-place
    change of ``W_dec`` (an optimiser step) gives the codes of the new decoder."""
    sae, x = _sae(), _x()
    first = encode_pairs(sae, x, "omp", k=3)
    assert all(torch.equal(a, b) for a, b in zip(first, encode_pairs(sae, x, "omp", k=3),
                                                 strict=True))
    with torch.no_grad():
        sae.W_dec[:24] *= -1.0
    fresh = SAE(SAEConfig(d_in=12, d_sae=48, k=4)).double().eval()
    fresh.load_state_dict(sae.state_dict())
    for a, b in zip(encode_pairs(sae, x, "omp", k=3), encode_pairs(fresh, x, "omp", k=3),
                    strict=True):
        torch.testing.assert_close(a, b)


def test_fista_encoder_finds_the_alpha_for_a_mean_l0():
    sae, x = _sae(), torch.randn(400, 12, dtype=torch.float64)
    z = Encoded(sae, "fista", k=4).encode(x)
    assert (z >= 0).all()
    assert float((z != 0).sum(1).double().mean()) == pytest.approx(4, abs=0.3)


def test_pursuits_beat_the_untrained_one_step_encoder_and_reach_their_l0():
    sae, x = _sae(), torch.randn(200, 12, dtype=torch.float64)
    fvu = {name: evaluate(Encoded(sae, name, k=4), x)["fvu"] for name in ENCODERS}
    l0 = evaluate(Encoded(sae, "omp", k=4), x)["l0"]
    assert l0 == pytest.approx(4.0) and SAE.encode(sae, x, "omp", k=4).shape == (200, 48)
    assert fvu["omp"] <= fvu["mp"] + 1e-9 and fvu["omp"] < fvu["trained"]
    assert np.isfinite(list(fvu.values())).all()


def test_bad_encoder_arguments():
    sae, x = _sae(), _x()
    with pytest.raises(ValueError, match="unknown encoder 'lista'; known encoders: trained, mp"):
        encode_pairs(sae, x, "lista")
    with pytest.raises(ValueError, match=r"k=49 must be in \[1, d_sae=48\]"):
        encode_pairs(sae, x, "omp", k=49)
    with pytest.raises(ValueError, match="tol must be >= 0"):
        encode_pairs(sae, x, "omp", tol=-1.0)


@pytest.mark.parametrize("encoder", ["mp", "topk"])
def test_a_learned_dictionary_becomes_an_sae_that_saelens_reads(encoder, tmp_path):
    """``from_dictionary``: a sparsecode estimator's ``components_`` as an SAE; saved, SAELens
    loads it as its own matching-pursuit / TopK SAE with the same latents and reconstruction,
    and the pursuit encoders run on it."""
    import warnings

    from sae_lens import SAE as SaeLensSAE

    from sae.io import from_dictionary, save_sae
    from sae.synthetic import planted_features
    from sparsecode import MiniBatchDictionaryLearning

    X, _ = planted_features(3000, 16, 24, l0=3, seed=1)
    X = X.numpy()
    est = MiniBatchDictionaryLearning(24, alpha=0.1, batch_size=256, max_iter=2,
                                      random_state=0).fit(X)
    sae = from_dictionary(est.components_, k=3, encoder=encoder, metadata={"hook_name": "h"})
    path = save_sae(sae, tmp_path / "dl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = SaeLensSAE.load_from_disk(path)
    x = torch.from_numpy(X[:50])
    z = sae.encode(x)
    assert ((z != 0).sum(1) <= 3).all() and (z != 0).any()
    torch.testing.assert_close(theirs.encode(x), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs.decode(z), sae.decode(z), atol=1e-5, rtol=1e-5)
    assert 2 < evaluate(Encoded(sae, "omp", k=3), x)["l0"] <= 3  # fewer on exactly-fit rows


def test_an_nnomp_coded_dictionary_encodes_with_nnomp_and_saves_as_matching_pursuit(tmp_path):
    """``from_dictionary(encoder="nnomp")`` is an ``online_dl`` SAE with ``pursuit="nnomp"``:
    its own encoder is the core's non-negative OMP on the (unit) atoms, the saved folder loads
    back as the same SAE, and SAELens reads it as its matching-pursuit SAE (which encodes with
    mp)."""
    import warnings

    from sae_lens import SAE as SaeLensSAE

    from sae.io import from_dictionary, load, save_sae

    D = torch.randn(40, 12, generator=torch.Generator().manual_seed(3))
    sae = from_dictionary(D * 3.0, k=4, encoder="nnomp")
    assert (sae.architecture, sae.cfg.pursuit) == ("online_dl", "nnomp")
    x = torch.randn(25, 12, generator=torch.Generator().manual_seed(4))
    prob = LeastSquares.from_data(x, D / D.norm(dim=1, keepdim=True))
    want = nnomp(prob, n_nonzero_coefs=4).codes.to_dense()
    assert (want > 0).sum(1).float().mean() > 2
    torch.testing.assert_close(sae.encode(x), want, atol=1e-5, rtol=1e-5)
    path = save_sae(sae, tmp_path / "nnomp")
    back = load(path)
    assert (back.architecture, back.cfg.pursuit) == ("online_dl", "nnomp")
    torch.testing.assert_close(back.encode(x), sae.encode(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = SaeLensSAE.load_from_disk(path)
    torch.testing.assert_close(theirs.encode(x), sae.encode(x, "mp", k=4), atol=1e-5, rtol=1e-5)


def test_only_online_dl_codes_with_a_pursuit_other_than_mp():
    with pytest.raises(ValueError, match="pursuit 'nnomp' codes online_dl dictionaries only"):
        SAEConfig(d_in=8, d_sae=16, k=4, architecture="mp", pursuit="nnomp")
    with pytest.raises(ValueError, match="unknown pursuit 'omp'; known pursuits: mp, nnomp"):
        SAEConfig(d_in=8, d_sae=16, k=4, architecture="online_dl", pursuit="omp")
