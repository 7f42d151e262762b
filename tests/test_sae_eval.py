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
