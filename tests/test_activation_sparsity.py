"""Activation sparsity at inference (sparsecode.activations) on tiny transformers models.

References: the dense Linear (sparse-input path equal on the kept inputs, values and
gradients), the requested sparsity on held-out tokens, the dense model after the hooks are
removed, a fresh model loading the saved rules, exact per-token budgets for top-k.
"""

import pytest
import torch
import transformers

from sparsecode.activations import (
    calibrate,
    load,
    measure_sparsity,
    sparse_decode,
    sparse_input_linear,
    sparsify_activations,
)
from sparsecode.hooks import HookPointError


def llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return llama()


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (96, 32), generator=g)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# --- the sparse-input Linear ------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_sparse_input_linear_equals_dense_values_and_gradients(bias):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(7, 11, generator=g, dtype=torch.float64)
    b = torch.randn(7, generator=g, dtype=torch.float64) if bias else None
    x = torch.randn(1, 1, 11, generator=g, dtype=torch.float64)
    x[..., [0, 3, 4, 9]] = 0
    Wt = W.T.contiguous().requires_grad_()
    W_ref = W.clone().requires_grad_()
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = sparse_input_linear(xs, Wt, b)
    y_ref = torch.nn.functional.linear(xr, W_ref, b)
    torch.testing.assert_close(y, y_ref)
    up = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (y * up).sum().backward()
    (y_ref * up).sum().backward()
    kept = x[0, 0] != 0
    torch.testing.assert_close(xs.grad[0, 0, kept], xr.grad[0, 0, kept])  # kept inputs
    torch.testing.assert_close(Wt.grad.T[:, kept], W_ref.grad[:, kept])
    assert (Wt.grad[~kept] == 0).all()  # dropped columns are not read
    # several tokens: the dense product; all-zero input: the bias
    x2 = torch.randn(3, 11, generator=g, dtype=torch.float64)
    torch.testing.assert_close(sparse_input_linear(x2, W.T.contiguous(), b),
                               torch.nn.functional.linear(x2, W, b))
    zero = sparse_input_linear(torch.zeros(11, dtype=torch.float64), W.T.contiguous(), b)
    torch.testing.assert_close(zero, b if bias else torch.zeros(7, dtype=torch.float64))


@pytest.mark.parametrize("method,rotate", [("wina", False), ("magnitude", True),
                                           ("cats", False), ("topk", True)])
def test_sparse_decode_generates_what_the_hooks_give(model, tokens, method, rotate):
    rules = sparsify_activations(model, tokens[:8], sparsity=0.5, method=method,
                                 allocation="uniform", rotate=rotate)
    try:
        prompt = tokens[20:21, :6]
        ref = model.generate(prompt, max_new_tokens=6, do_sample=False)
        logits = model(input_ids=tokens[21:22, :5]).logits
        with sparse_decode(model, rules) as names:
            assert len(names) == 14 and not rules._handles  # the hooks are lifted inside
            out = model.generate(prompt, max_new_tokens=6, do_sample=False)
            torch.testing.assert_close(model(input_ids=tokens[21:22, :5]).logits, logits,
                                       atol=1e-4, rtol=1e-4)
        assert torch.equal(out, ref)
        assert "forward" not in vars(model.model.layers[0].mlp.down_proj)  # restored
        assert rules._handles  # re-attached
        with pytest.raises(RuntimeError, match="inside"), sparse_decode(model, rules):
            raise RuntimeError("inside")
        assert "forward" not in vars(model.model.layers[1].mlp.gate_proj)  # restored on error
        assert rules._handles
    finally:
        rules.remove()


def test_sparse_decode_reads_only_the_kept_rows(model, tokens):
    """One token through a fused group equals the dense product of its sparse coordinates
    with the stacked (rotated) weight, and reads only those rows: rows of zero coordinates
    can be NaN without changing the output."""
    from sparsecode.activations.linear import _GroupForward

    rules = sparsify_activations(model, tokens[:8], sparsity=0.6, allocation="uniform",
                                 rotate=True)
    rules.remove()
    (g,) = [g for g in rules.groups if g.linears[0].endswith("layers.1.mlp.gate_proj")]
    assert g.rotation is not None and len(g.linears) == 2
    fused = _GroupForward(model, g)
    x = torch.randn(1, 1, g.width, generator=torch.Generator().manual_seed(0))
    z = g.coords(x)
    assert 0 < int((z == 0).sum()) < g.width
    W = torch.cat([model.model.layers[1].mlp.gate_proj.weight,
                   model.model.layers[1].mlp.up_proj.weight]).detach()
    want = (g.apply(x) @ W.T).split([W.shape[0] // 2] * 2, dim=-1)
    fused.weight_t[(z.reshape(-1) == 0)] = float("nan")
    for j in range(2):
        torch.testing.assert_close(fused.linear(j)(x), want[j], atol=1e-5, rtol=1e-5)


# --- calibration -------------------------------------------------------------------------------


@pytest.mark.parametrize("method,rotate", [("magnitude", False), ("wina", False),
                                           ("cats", False), ("magnitude", True)])
def test_thresholds_reach_the_requested_sparsity_on_heldout(model, tokens, method, rotate):
    rules = sparsify_activations(model, tokens[:48], sparsity=0.4, method=method,
                                 allocation="uniform", heldout=tokens[48:], rotate=rotate)
    rules.remove()
    assert len(rules.groups) == 8  # qkv, o, gate+up, down per block
    for g in rules.groups:
        assert abs(rules.achieved[g.name] - 0.4) <= 0.02, (g.name, rules.achieved[g.name])
    if method == "cats":
        assert sum(g.act is not None for g in rules.groups) == 2
        assert rules.groups[3].act == "model.layers.0.mlp.act_fn"


def test_a_rotated_rule_sparsifies_the_principal_coordinates(model, tokens):
    """LaRoSA: the MLP input's rotation is the Gram's eigenbasis (largest first); the hooked
    Linear sees ``threshold(x Q) Q^T``, i.e. reads ``W Q`` on the sparse coordinates."""
    cal = calibrate(model, tokens[:8], "magnitude", rotate=True)
    rotated = [g for g in cal.groups if g.rotation is not None]
    assert [g.linears for g in rotated] == [[f"model.layers.{i}.mlp.gate_proj",
                                             f"model.layers.{i}.mlp.up_proj"] for i in (0, 1)]
    g = rotated[0]
    Q = g.rotation
    torch.testing.assert_close(Q.T @ Q, torch.eye(g.width), atol=1e-5, rtol=0)
    xs = []
    h = model.model.layers[0].mlp.gate_proj.register_forward_pre_hook(
        lambda m, a: xs.append(a[0].reshape(-1, g.width)))
    logits(model, tokens[:8])
    h.remove()
    X = torch.cat(xs).double()
    var = ((X @ Q.double()) ** 2).sum(0)  # energy per principal coordinate, decreasing
    assert torch.all(var[:-1] >= var[1:] * (1 - 1e-6))
    rules = cal.plan(0.5, "uniform")
    g = next(r for r in rules.groups if r.rotation is not None)
    x = X[:5].float()
    z = x @ Q
    want = torch.where(z.abs() > g.threshold, z, 0) @ Q.T
    torch.testing.assert_close(g.apply(x), want)
    up = model.model.layers[0].mlp.up_proj
    seen = []
    hs = [up.register_forward_pre_hook(lambda m, a: seen.append(a[0])),  # before the rule
          up.register_forward_hook(lambda m, a, out: seen.append(a[0]))]  # after it
    with rules.attached(model):
        logits(model, tokens[:1])
    for h in hs:
        h.remove()
    z = seen[0] @ Q
    torch.testing.assert_close(seen[1], torch.where(z.abs() > g.threshold, z, 0) @ Q.T)


def test_topk_keeps_exactly_k_per_token(model, tokens):
    rules = calibrate(model, tokens[:4], "topk").plan(0.25)
    got = measure_sparsity(rules, model, tokens[12:16])
    for g in rules.groups:
        assert g.k == round(0.75 * g.width)
        assert got[g.name] == pytest.approx(1 - g.k / g.width, abs=1e-6)


def test_global_allocation_meets_the_target_where_the_loss_cost_is_least(model, tokens):
    cal = calibrate(model, tokens[:8], "magnitude")
    plan = cal.plan(0.5, "global")
    assert plan.sparsity == pytest.approx(0.5, abs=1e-9)
    curves = cal._curves
    for g in plan.groups:  # costs grow with the level; levels where the greedy put them
        assert (curves[g.name].diff() >= 0).all() and curves[g.name][0] == 0
    assert len({round(g.sparsity, 6) for g in plan.groups}) > 1
    assert logit_error(model, cal, "global", tokens) < logit_error(model, cal, "uniform", tokens)


def logit_error(model, cal, allocation, tokens, sparsity=0.5):
    """Mean squared logit change on held-out tokens with ``cal``'s rules for ``allocation``."""
    dense = logits(model, tokens[12:])
    with cal.plan(sparsity, allocation).attached(model):
        return float(((logits(model, tokens[12:]) - dense) ** 2).mean())


def test_greedy_meets_the_weighted_target_per_block(model, tokens):
    cal = calibrate(model, tokens[:8], "magnitude")
    cal.greedy_tokens = 256
    plan = cal.plan(0.5, "greedy")
    assert plan.sparsity == pytest.approx(0.5, abs=1e-9)
    for block in range(2):
        mine = [g for g in plan.groups if g.name.startswith(f"model.layers.{block}.")]
        total = sum(g.params for g in mine)
        assert sum(g.sparsity * g.params for g in mine) / total == pytest.approx(0.5, abs=1e-9)
    assert len({round(g.sparsity, 6) for g in plan.groups}) > 1  # not uniform
    # greedy lowers the block error it optimises, compared with uniform at the same target
    assert logit_error(model, cal, "greedy", tokens) < logit_error(model, cal, "uniform", tokens)


# --- attach, remove, save, load ----------------------------------------------------------------


def test_hooks_removed_on_exit_and_on_error(model, tokens):
    dense = logits(model, tokens[:2])
    plan = calibrate(model, tokens[:4], "magnitude").plan(0.6)
    with plan.attached(model):
        assert not torch.allclose(logits(model, tokens[:2]), dense)
    torch.testing.assert_close(logits(model, tokens[:2]), dense)
    with pytest.raises(RuntimeError, match="boom"), plan.attached(model):
        raise RuntimeError("boom")
    torch.testing.assert_close(logits(model, tokens[:2]), dense)


@pytest.mark.parametrize("method,rotate", [("wina", False), ("cats", False), ("topk", False),
                                           ("wina", True)])
def test_saved_rules_reattach_to_a_fresh_model(model, tokens, tmp_path, method, rotate):
    rules = sparsify_activations(model, tokens[:8], sparsity=0.5, method=method,
                                 heldout=tokens[8:12], rotate=rotate)
    want = logits(model, tokens[12:14])
    rules.remove()
    path = rules.save(tmp_path / "rules.json")
    assert path.stat().st_size < 20_000  # thresholds only, no column norms
    side = tmp_path / "rules.rotations.safetensors"
    assert side.exists() == rotate
    fresh = llama()
    fresh.load_state_dict(model.state_dict())
    loaded = load(path, fresh)
    torch.testing.assert_close(logits(fresh, tokens[12:14]), want)
    assert loaded.achieved == pytest.approx(rules.achieved)
    loaded.remove()


# --- bad input -----------------------------------------------------------------------------------


def test_bad_input(model, tokens, tmp_path):
    for s in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
            sparsify_activations(model, tokens[:4], sparsity=s)
    with pytest.raises(HookPointError, match="close matches"):
        sparsify_activations(model, tokens[:4], layers="model.layers.*.mlp.dwn_proj")
    with pytest.raises(ValueError, match="no nn.Linear"):
        sparsify_activations(model, tokens[:4], layers="model.layers.*.mlp")
    with pytest.raises(ValueError, match="method must be one of"):
        sparsify_activations(model, tokens[:4], method="teal")
    with pytest.raises(ValueError, match="calibration set is empty"):
        sparsify_activations(model, tokens[:0])
    cfg = transformers.OPTConfig(vocab_size=96, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                 num_attention_heads=2, word_embed_proj_dim=16)
    opt = transformers.OPTForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="'cats' thresholds the gate of a gated MLP"):
        sparsify_activations(opt, tokens[:4], method="cats")
    with pytest.raises(ValueError, match="rotate=True rotates the input of gated MLPs"):
        sparsify_activations(opt, tokens[:4], rotate=True)
    with pytest.raises(TypeError, match="needs the ActivationSparsity rules"):
        with sparse_decode(model, ["model.layers.0.mlp.down_proj"]):
            pass
    rot = calibrate(model, tokens[:4], "magnitude", rotate=True).plan(0.3)
    path = rot.save(tmp_path / "rot.json")
    side = tmp_path / "rot.rotations.safetensors"
    blob = bytearray(side.read_bytes())
    blob[-1] ^= 1
    side.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="rot.rotations.safetensors does not match its checksum"):
        load(path, model)
    side.unlink()
    with pytest.raises(ValueError, match="cannot read its rotations"):
        load(path, model)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load(bad, model)
    rules = calibrate(model, tokens[:4], "magnitude").plan(0.3)
    rules.save(tmp_path / "r.json")
    with pytest.raises(ValueError, match="reads 16 features in this model, 32 in the saved"):
        small = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=96, hidden_size=16, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2))
        load(tmp_path / "r.json", small)
