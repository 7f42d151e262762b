"""sparsecode.hooks on a tiny randomly initialised Llama (no download) and small torch modules."""

import pytest
import torch
from torch import nn

from sparsecode.hooks import HookPointError, ablate, capture, resolve, splice, steer

transformers = pytest.importorskip("transformers")

N_LAYERS = 3
D = 32


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(llama, ids):
    with torch.no_grad():
        return llama(ids, output_hidden_states=True)


class TinySAE(nn.Module):
    """ReLU SAE: z = relu((x - b_dec) W_enc + b_enc), x_hat = z W_dec + b_dec."""

    def __init__(self, d_in=D, d_sae=48, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = nn.Parameter(torch.randn(d_in, d_sae, generator=g) * 0.3)
        self.b_enc = nn.Parameter(torch.randn(d_sae, generator=g) * 0.1)
        self.W_dec = nn.Parameter(torch.randn(d_sae, d_in, generator=g) * 0.3)
        self.b_dec = nn.Parameter(torch.randn(d_in, generator=g) * 0.1)

    def encode(self, x):
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, z):
        return z @ self.W_dec + self.b_dec


def hook_ids(model):
    """Every forward (pre-)hook on the model (transformers installs its own recorders once)."""
    return {
        (name, kind, key)
        for name, m in model.named_modules()
        for kind, hooks in (("post", m._forward_hooks), ("pre", m._forward_pre_hooks))
        for key in hooks
    }


# ----------------------------------------------------------------------------- resolve


def test_resolve_globs_in_module_order(llama):
    assert resolve(llama, "model.layers.*.mlp") == [f"model.layers.{i}.mlp" for i in range(3)]
    assert resolve(llama, "model.layers.*") == [f"model.layers.{i}" for i in range(3)]
    assert resolve(llama, "model.**.down_proj") == [
        f"model.layers.{i}.mlp.down_proj" for i in range(3)
    ]
    assert resolve(llama, "model.layers.[!0].mlp") == ["model.layers.1.mlp", "model.layers.2.mlp"]
    got = resolve(llama, ["model.layers.2", "model.layers.0", "model.layers.?", "lm_head"])
    assert got == ["model.layers.0", "model.layers.1", "model.layers.2", "lm_head"]
    assert resolve(llama, "") == [""]
    assert "" not in resolve(llama, "*")


@pytest.mark.parametrize(
    "bad, hint",
    [
        ("model.layer.1", "'model.layers.1'"),
        ("layers.1.mlp", "'model.layers.1.mlp'"),
        ("model.layers.*.mlpp", "model.layers.0.mlp"),
    ],
)
def test_unknown_point_lists_close_matches(llama, bad, hint):
    with pytest.raises(HookPointError) as info:
        resolve(llama, bad)
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    msg = str(info.value)
    assert repr(bad) in msg and "close matches" in msg and hint in msg


# ----------------------------------------------------------------------------- capture


def test_capture_layers_equal_hidden_states(llama, ids, reference):
    hs = reference.hidden_states
    with capture(llama, "model.layers.*") as acts, torch.no_grad():
        out = acts.run(ids)
    assert torch.equal(out.logits, reference.logits)
    assert list(acts) == [f"model.layers.{i}" for i in range(N_LAYERS)]
    assert acts.points == resolve(llama, "model.layers.*")
    for i in range(N_LAYERS - 1):
        assert torch.equal(acts[f"model.layers.{i}"], hs[i + 1])
    # transformers reports the final hidden state after the final norm
    last = acts[f"model.layers.{N_LAYERS - 1}"]
    assert torch.equal(llama.model.norm(last), hs[N_LAYERS])


def test_capture_inputs(llama, ids, reference):
    with capture(llama, ["model.layers.1", "model.norm"], inputs=True) as acts, torch.no_grad():
        llama(ids)
    assert torch.equal(acts["model.layers.1"], reference.hidden_states[1])
    assert torch.equal(llama.model.norm(acts["model.norm"]), reference.hidden_states[-1])


def test_stop_early_skips_later_modules(llama, ids, reference):
    before = hook_ids(llama)
    calls = {"layer1": 0, "lm_head": 0}
    first_op = llama.model.layers[1].input_layernorm  # runs first inside layer 1
    h1 = first_op.register_forward_pre_hook(lambda *a: calls.__setitem__("layer1", 1))
    h2 = llama.lm_head.register_forward_pre_hook(lambda *a: calls.__setitem__("lm_head", 1))
    try:
        with capture(llama, "model.layers.0", stop_early=True) as acts, torch.no_grad():
            assert acts.run(ids) is None
            assert acts.stopped
        assert calls == {"layer1": 0, "lm_head": 0}
        assert torch.equal(acts["model.layers.0"], reference.hidden_states[1])
        # capturing an input stops before that module runs at all
        with capture(llama, "model.layers.1", inputs=True, stop_early=True) as acts:
            with torch.no_grad():
                acts.run(ids)
        assert calls["layer1"] == 0
        assert torch.equal(acts["model.layers.1"], reference.hidden_states[1])
        # without stop_early everything runs
        with capture(llama, "model.layers.0") as acts, torch.no_grad():
            assert acts.run(ids) is not None and not acts.stopped
        assert calls == {"layer1": 1, "lm_head": 1}
    finally:
        h1.remove()
        h2.remove()
    assert hook_ids(llama) == before


def test_capture_keeps_latest_forward_and_graph(llama, ids):
    with capture(llama, "model.layers.0", detach=False) as acts:
        llama(ids[:1])
        first = acts["model.layers.0"]
        llama(ids)
        assert acts["model.layers.0"].shape[0] == 2 and first.shape[0] == 1
        assert acts["model.layers.0"].requires_grad
    with pytest.raises(KeyError, match="not captured"):
        acts["model.layers.1"]


@pytest.mark.parametrize("kind", ["capture", "splice", "steer", "ablate"])
def test_hooks_removed_when_body_raises(llama, ids, kind):
    sae = TinySAE()
    managers = {
        "capture": lambda: capture(llama, "model.layers.*", stop_early=True),
        "splice": lambda: splice(llama, {"model.layers.1": sae}, keep_error=True),
        "steer": lambda: steer(llama, "model.layers.*", sae, latent=3, coefficient=2.0),
        "ablate": lambda: ablate(llama, {"model.layers.0": sae}, [1, 2]),
    }
    llama(ids, output_hidden_states=True)  # let transformers install its own recorders first
    before = hook_ids(llama)
    with pytest.raises(RuntimeError, match="boom"), managers[kind]():
        assert hook_ids(llama) > before
        raise RuntimeError("boom")
    assert hook_ids(llama) == before


# ----------------------------------------------------------------------------- splice


def test_splice_keep_error_leaves_logits(llama, ids, reference):
    sae = TinySAE()
    with splice(llama, {"model.layers.1": sae}, keep_error=True) as sp, torch.no_grad():
        out = llama(ids)
    assert torch.allclose(out.logits, reference.logits, atol=1e-5)
    x = reference.hidden_states[2]
    z = sp.latents["model.layers.1"]
    assert z.shape == (2, 12, 48)
    assert torch.allclose(z, sae.encode(x), atol=1e-6)
    assert torch.allclose(sp.errors["model.layers.1"], x - sae.decode(sae.encode(x)), atol=1e-6)


def test_splice_replaces_output_by_reconstruction(llama, ids, reference):
    sae = TinySAE(seed=3)
    x = reference.hidden_states[2]
    with splice(llama, {"model.layers.1": sae}) as sp, torch.no_grad():
        with capture(llama, "model.layers.1") as acts:
            out = llama(ids)
    spliced = acts["model.layers.1"]
    assert torch.equal(spliced, sae.decode(sae.encode(x)))
    # the output moved by exactly the SAE error
    assert torch.allclose(x - spliced, sp.errors["model.layers.1"], atol=1e-6)
    assert not torch.allclose(out.logits, reference.logits, atol=1e-3)


def test_splice_tuple_output_keeps_rest():
    class Pair(nn.Module):
        def forward(self, x):
            return (2 * x, "extra", x)

    net = nn.Sequential(Pair())
    sae = TinySAE(d_in=4, d_sae=6)
    x = torch.randn(5, 4)
    with capture(net, "0") as acts:
        net(x)
    assert torch.equal(acts["0"], 2 * x)
    with splice(net, {"0": sae}), torch.no_grad():
        out = net(x)
    assert torch.equal(out[0], sae.decode(sae.encode(2 * x)))
    assert out[1] == "extra" and out[2] is x


def test_splice_rejects_non_sae(llama):
    with pytest.raises(TypeError, match="encode"), splice(llama, {"model.layers.0": object()}):
        pass


# ----------------------------------------------------------------------------- steer / ablate


def layer_out(model, ids, point):
    with capture(model, point) as acts, torch.no_grad():
        model(ids)
    return acts[point]


def test_steer_adds_exactly_the_direction(llama, ids, reference):
    sae = TinySAE()
    x = reference.hidden_states[2]
    with steer(llama, "model.layers.1", sae, latent=5, coefficient=-4.0) as delta:
        got = layer_out(llama, ids, "model.layers.1")
    assert torch.equal(delta, -4.0 * sae.W_dec[5].detach())
    assert torch.equal(got, x + delta)
    v = torch.randn(D)
    with steer(llama, "model.layers.1", v, coefficient=0.5):
        got = layer_out(llama, ids, "model.layers.1")
    assert torch.equal(got, x + 0.5 * v)
    with pytest.raises(ValueError, match="latent must be None"):
        with steer(llama, "model.layers.1", v, latent=2):
            pass
    with pytest.raises(ValueError, match="latent index"), steer(llama, "model.layers.1", sae):
        pass


def test_ablate_formula(llama, ids, reference):
    sae = TinySAE(seed=5)
    x = reference.hidden_states[1]
    z = sae.encode(x).detach()
    with torch.no_grad():
        with ablate(llama, {"model.layers.0": sae}, list(range(48))) as st:
            got = layer_out(llama, ids, "model.layers.0")
        # all latents: x minus the reconstruction without its bias (the error and b_dec stay)
        assert torch.allclose(got, x - (sae.decode(z) - sae.b_dec), atol=1e-5)
        assert torch.allclose(st.latents["model.layers.0"], z)
        chosen = [3, 7, 40]
        with ablate(llama, {"model.layers.0": sae}, {"model.layers.0": chosen}):
            got = layer_out(llama, ids, "model.layers.0")
        expect = x - sum(z[..., j : j + 1] * sae.W_dec[j] for j in chosen)
        assert torch.allclose(got, expect, atol=1e-5)
        with ablate(llama, {"model.layers.0": sae}, []):
            assert torch.equal(layer_out(llama, ids, "model.layers.0"), x)
    with pytest.raises(IndexError, match="out of range"):
        with ablate(llama, {"model.layers.0": sae}, [48]):
            pass
