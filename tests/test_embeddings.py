"""Embeddings against transformers: the base model's last hidden states, pooled here independently."""

import base64

import numpy as np
import openai
import pytest
import torch
from transformers import AutoModel

from server_process import ServerProcess
from tiny_models import save_tiny

TEXTS = ["the cat sat on the mat", "hello", "an embedding of a somewhat longer sentence, with punctuation!", "a b c"]


def reference_embeddings(path, token_lists, pooling, dimensions=None):
    """transformers' hidden states, one text at a time (no padding), pooled and normalised in numpy."""
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for ids in token_lists:
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0].numpy().astype(np.float64)
        v = hidden[-1] if pooling == "last" else hidden.sum(axis=0) / len(ids)
        v = v[:dimensions] if dimensions else v
        out.append(v / np.sqrt((v * v).sum()))
    return np.stack(out)


def cosines(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def tiny(request, tmp_path_factory):
    from qwenkit.engine.llm import LLM

    path = tmp_path_factory.mktemp(f"tiny-embed-{request.param}")
    save_tiny(request.param, path)
    return path, LLM(str(path))


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_embed_matches_transformers(tiny, pooling):
    path, llm = tiny
    from qwenkit.engine.embedding import embedding_token_ids

    ids = [embedding_token_ids(llm.tokenizer, t) for t in TEXTS]
    ours = llm.embed(TEXTS, pooling=pooling).numpy()
    ref = reference_embeddings(path, ids, pooling)
    assert ours.shape == ref.shape
    assert cosines(ours, ref).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)
    # A batch packed into one pass gives what each text gives alone.
    alone = np.stack([llm.embed(t, pooling=pooling).numpy()[0] for t in TEXTS])
    assert cosines(ours, alone).min() >= 0.99999
    # Matryoshka: the leading coordinates, renormalised.
    short = llm.embed(TEXTS, pooling=pooling, dimensions=16).numpy()
    assert short.shape == (len(TEXTS), 16)
    assert cosines(short, reference_embeddings(path, ids, pooling, 16)).min() >= 0.9999


def test_embed_rejects_bad_input(tiny):
    from qwenkit.errors import QwenkitError

    _, llm = tiny
    with pytest.raises(QwenkitError, match="dimensions"):
        llm.embed("x", dimensions=10_000)
    with pytest.raises(QwenkitError, match="pooling"):
        llm.embed("x", pooling="cls")
    with pytest.raises(QwenkitError, match="context"):
        llm.embed([1] * 1000)
    assert llm.embed([1] * 1000, truncate=True).shape[0] == 1
