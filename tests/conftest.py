"""Shared test set-up."""

import os

import numpy as np
import pytest
import torch

# With triton installed (the `kernels` extra), sparsify picks its Triton decoder at import even
# without a GPU and fails; its own switch sends it to the eager path, as on any CPU machine.
if not torch.cuda.is_available():
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    # The solvers run many small batched ops; on a shared 2-core machine torch's thread pool
    # spins against other processes and slows them by more than an order of magnitude. One
    # thread keeps the suite's time predictable (speed is measured in benchmarks/, not here).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def unit_rows(D: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (atoms)."""
    return D / np.linalg.norm(D, axis=1, keepdims=True)


# ------------------------------------------------------------------ tiny language model
#: Token texts of :func:`tiny_tokenizer` beyond the specials: awkward ones first (markup that
#: must be escaped, whitespace that must show), then plain words ``w7 ... w127``.
TINY_SPECIAL_WORDS = [
    "<script>alert(1)</script>",
    '<img src=x onerror="document.body.dataset.pwned=1">',
    "a\nb",
    "\t",
    " lead",
]
TINY_VOCAB = 128


@pytest.fixture(scope="session")
def tiny_llama():
    """A randomly initialised 3-layer Llama (d=32, vocab 128), eval mode, no grad."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A word-level tokenizer whose vocabulary covers all ``TINY_VOCAB`` ids of ``tiny_llama``:
    ``<unk> <s> </s>``, then ``TINY_SPECIAL_WORDS``, then ``w{id}``."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<unk>", "<s>", "</s>", *TINY_SPECIAL_WORDS]
    words += [f"w{i}" for i in range(len(words), TINY_VOCAB)]
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture()
def tiny_model_and_texts(tiny_llama, tiny_tokenizer, tmp_path):
    """``(model_dir, texts_dir)``: ``tiny_llama`` + ``tiny_tokenizer`` saved as a Hugging Face
    folder, and 30 text files of 80 random ``w{id}`` words (the CLI's ``--model`` / ``--text``)."""
    model_dir = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    texts = tmp_path / "texts"
    texts.mkdir()
    gen = torch.Generator().manual_seed(3)
    for i in range(30):
        ids = torch.randint(8, 128, (80,), generator=gen).tolist()
        (texts / f"doc{i:02d}.txt").write_text(" ".join(f"w{j}" for j in ids))
    return model_dir, texts
