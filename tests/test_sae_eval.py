"""Language-model metrics of a spliced SAE (CE-loss recovered, KL) on a tiny random Llama."""

import pytest
import torch

from sae.metrics import model_metrics
from sae.models import SAE, SAEConfig

transformers = pytest.importorskip("transformers")

D = 32


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval().requires_grad_(False)


def _relu_sae(W_enc, W_dec):
    sae = SAE(SAEConfig(d_in=D, d_sae=W_dec.shape[0], architecture="relu", k=1))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
    return sae.eval()


def _tokens():
    return torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(1))


def test_exact_sae_recovers_everything(llama):
    eye = torch.eye(D)
    # relu(x) - relu(-x) = x: a perfect two-sided dictionary
    sae = _relu_sae(torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0))
    m = model_metrics(llama, sae, "model.layers.1", _tokens(), massive_factor=None)
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert m["kl_sae"] == pytest.approx(0.0, abs=1e-5)
    assert m["fvu"] == pytest.approx(0.0, abs=1e-6)
    assert m["ce_zero"] != pytest.approx(m["ce_clean"])
    assert m["fraction_spliced"] == 1.0
    assert m["n_tokens"] == 6 * 14


def test_zero_sae_recovers_nothing_and_matches_manual_ce(llama):
    sae = _relu_sae(torch.zeros(D, 8), torch.randn(8, D))  # never fires: output = b_dec = 0
    toks = _tokens()
    m = model_metrics(llama, sae, "model.layers.1", toks, massive_factor=None)
    assert m["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert m["delta_lm_loss"] == pytest.approx(m["ce_zero"] - m["ce_clean"])
    with torch.no_grad():
        logits = llama(input_ids=toks).logits
    ce = torch.nn.functional.cross_entropy(
        logits[:, 1:-1].reshape(-1, 128), toks[:, 2:].reshape(-1)
    )
    assert m["ce_clean"] == pytest.approx(float(ce), rel=1e-5)


def test_first_position_is_never_spliced(llama):
    sae = _relu_sae(torch.zeros(D, 8), torch.randn(8, D))
    toks = _tokens()

    # later positions attend to position 0: splicing it too would change every prediction
    def zero_after_first(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[:, 1:] = 0
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = llama.model.layers[1].register_forward_hook(zero_after_first)
    try:
        with torch.no_grad():
            logits = llama(input_ids=toks).logits
    finally:
        handle.remove()
    ce = torch.nn.functional.cross_entropy(
        logits[:, 1:-1].reshape(-1, 128), toks[:, 2:].reshape(-1)
    )
    m = model_metrics(llama, sae, "model.layers.1", toks, massive_factor=None)
    assert m["ce_sae"] == pytest.approx(float(ce), rel=1e-5)


def test_exact_crosscoder_over_two_layers_recovers_everything(llama):
    """A crosscoder reconstructing two layers exactly (the two-sided identity per place) leaves
    the model unchanged when spliced at both at once."""
    eye = torch.eye(2 * D)
    cfg = SAEConfig(d_in=2 * D, d_sae=4 * D, architecture="relu", k=1, places=[D, D],
                    metadata={"hook_names": ["model.layers.0", "model.layers.2"]})
    cc = SAE(cfg)
    with torch.no_grad():
        cc.W_enc.copy_(torch.cat([eye, -eye], 1))
        cc.W_dec.copy_(torch.cat([eye, -eye], 0))
    m = model_metrics(llama, cc.eval(), None, _tokens(), massive_factor=None)
    assert m["ce_sae"] == pytest.approx(m["ce_clean"], abs=1e-4)
    assert m["kl_sae"] == pytest.approx(0.0, abs=1e-5)
    assert m["fvu_place0"] < 1e-8 and m["fvu_place1"] < 1e-8
    assert abs(m["ce_zero"] - m["ce_clean"]) > 1e-3  # zeroing both layers changes the model


def test_transcoder_splice_equals_replacing_the_mlp_output(llama):
    """A transcoder of layer 1's MLP spliced in: the CE with the MLP's output replaced by the
    transcoder of the MLP's input, written out with plain forward hooks."""
    cfg = SAEConfig(d_in=D, d_sae=64, d_out=D, architecture="topk", k=8, transcode=True,
                    skip=True, metadata={"hook_name": "model.layers.1.mlp:input",
                                         "hook_name_out": "model.layers.1.mlp"})
    tc = SAE(cfg, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tc.W_skip.copy_(0.1 * torch.randn(D, D, generator=torch.Generator().manual_seed(3)))
    tc.eval()
    toks = _tokens()
    m = model_metrics(llama, tc, None, toks, massive_factor=None)
    mlp = llama.model.layers[1].mlp

    def replace(module, args, output):
        out = tc(args[0])
        out[:, 0] = output[:, 0]  # position 0 keeps its activation
        return out

    handle = mlp.register_forward_hook(replace)
    try:
        with torch.no_grad():
            logits = llama(input_ids=toks).logits.float()
    finally:
        handle.remove()
    logp = torch.log_softmax(logits[:, 1:-1], dim=-1)
    ce = float(-logp.gather(-1, toks[:, 2:, None]).mean())
    assert m["ce_sae"] == pytest.approx(ce, rel=1e-5)
    assert 0 <= m["fvu"] and "fvu_place0" not in m
