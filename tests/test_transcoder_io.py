"""Transcoder and crosscoder files: SAELens and sparsify read our transcoders and reproduce
them, we read theirs, crosscoders round-trip through their own layout."""

import json

import pytest
import torch
from torch.testing import assert_close

from sae.io import load, load_sae, save_sae, save_sparsify
from sae.models import SAE, SAEConfig

TOL = {"rtol": 1e-5, "atol": 1e-5}
META = {"hook_name": "model.layers.3.mlp:input", "hook_name_out": "model.layers.3.mlp"}


def _transcoder(arch, skip, d_in=10, d_out=6, seed=0):
    cfg = SAEConfig(d_in=d_in, d_sae=24, d_out=d_out, architecture=arch, k=3, transcode=True,
                    skip=skip, metadata=dict(META))
    sae = SAE(cfg, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(24, generator=g))
        sae.b_dec.copy_(0.5 * torch.randn(d_out, generator=g))
        sae.threshold.copy_(0.2 * torch.rand(24, generator=g))
        sae.x_centre.copy_(torch.randn(d_in, generator=g))  # folded into b_enc when saved
        if skip:
            sae.W_skip.copy_(0.3 * torch.randn(d_out, d_in, generator=g))
    return sae.eval()


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch,theirs", [("relu", "transcoder"),
                                         ("jumprelu", "jumprelu_transcoder"),
                                         ("batchtopk", "jumprelu_transcoder")])
def test_sae_lens_reads_our_transcoders(arch, theirs, skip, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    s_in, s_out = 2.0, 0.25
    sae = _transcoder(arch, skip)
    path = save_sae(sae, tmp_path / "tc", input_scale=s_in, output_scale=s_out)
    cfg = json.loads((path / "cfg.json").read_text())
    want = {"transcoder": "skip_transcoder",
            "jumprelu_transcoder": "jumprelu_skip_transcoder"}[theirs] if skip else theirs
    assert cfg["architecture"] == want and cfg["d_out"] == 6
    loaded = sae_lens.SAE.load_from_disk(path)
    assert loaded.cfg.architecture() == want
    x = torch.randn(17, 10, generator=torch.Generator().manual_seed(3)) + 0.5
    with torch.no_grad():
        assert_close(loaded.encode(x), sae.encode(s_in * x), **TOL)
        assert_close(loaded(x), sae(s_in * x) / s_out, **TOL)
        again = load(path)  # our reader restores the transcoder
        assert again.cfg.transcode and again.cfg.skip == skip and again.cfg.d_out == 6
        assert again.cfg.metadata["hook_name_out"] == META["hook_name_out"]
        assert_close(again(x), loaded(x), **TOL)


def test_we_read_sae_lens_transcoders(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    cfg = sae_lens.JumpReLUSkipTranscoderConfig(d_in=10, d_sae=24, d_out=6,
                                                apply_b_dec_to_input=False)
    theirs = sae_lens.JumpReLUSkipTranscoder(cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        theirs.threshold.abs_()
    theirs.save_model(tmp_path / "theirs")
    ours = load_sae(tmp_path / "theirs")
    assert ours.architecture == "jumprelu" and ours.cfg.transcode and ours.cfg.skip
    x = torch.randn(9, 10, generator=g)
    with torch.no_grad():
        assert_close(ours(x), theirs(x), **TOL)


def test_topk_transcoder_is_sparsify_format_and_ours(tmp_path):
    """SAELens has no top-k transcoder: the SAELens-style folder is ours only; sparsify's
    layout (same width in and out) is what other tools read."""
    sparsify = pytest.importorskip("sparsify")
    sae = _transcoder("topk", skip=True, d_out=10)
    x = torch.randn(13, 10, generator=torch.Generator().manual_seed(4))
    path = save_sparsify(sae, tmp_path / "layers.3.mlp", input_scale=1.5, output_scale=0.5)
    theirs = sparsify.SparseCoder.load_from_disk(path)
    assert theirs.cfg.transcode and theirs.cfg.skip_connection
    with torch.no_grad():
        assert_close(theirs(x).sae_out, sae(1.5 * x) / 0.5, **TOL)
        back = load(path)
        assert back.cfg.transcode and back.cfg.skip
        assert_close(back(x), theirs(x).sae_out, **TOL)
    ours = save_sae(sae, tmp_path / "ours")
    assert json.loads((ours / "cfg.json").read_text())["architecture"] == "topk_skip_transcoder"
    assert_close(load(ours)(x), sae(x), **TOL)
    with pytest.raises(ValueError, match="write the width they read"):
        save_sparsify(_transcoder("topk", skip=False), tmp_path / "wide")


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu", "batchtopk"])
def test_crosscoder_round_trip_per_place_scales(arch, tmp_path):
    names = ["model.layers.6", "model.layers.12", "model.layers.18"]
    cfg = SAEConfig(d_in=12, d_sae=32, k=4, architecture=arch, places=[3, 4, 5],
                    metadata={"hook_names": names})
    cc = SAE(cfg, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cc.b_dec.copy_(torch.randn(12, generator=torch.Generator().manual_seed(6)))
        cc.threshold.fill_(0.05)
    cc.eval()
    scales = [2.0, 0.5, 3.0]
    path = save_sae(cc, tmp_path / "cc", input_scale=scales)
    cfg_json = json.loads((path / "cfg.json").read_text())
    assert cfg_json["architecture"] == "crosscoder"
    assert [p["hook_name"] for p in cfg_json["places"]] == names
    again = load(path)
    assert again.cfg.places == [3, 4, 5] and again.cfg.metadata["hook_names"] == names
    s = torch.tensor([2.0] * 3 + [0.5] * 4 + [3.0] * 5)
    x = torch.randn(11, 12, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert_close(again.encode(x), cc.encode(s * x), **TOL)
        assert_close(again(x) * s, cc(s * x), **TOL)
    with pytest.raises(ValueError, match="SAELens has no crosscoder class"):
        load_sae(path)


def test_sae_lens_loader_stops_at_a_crosscoder(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    cc = SAE(SAEConfig(d_in=8, d_sae=16, k=2, places=[4, 4],
                       metadata={"hook_names": ["a", "b"]}))
    path = save_sae(cc, tmp_path / "cc")
    with pytest.raises(Exception, match="crosscoder"):
        sae_lens.SAE.load_from_disk(path)
