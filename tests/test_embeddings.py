"""Embeddings against transformers: the base model's last hidden states, pooled here independently."""

import base64

import numpy as np
import openai
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

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
    ids = AutoTokenizer.from_pretrained(path)(TEXTS)["input_ids"]
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


# ---- /v1/embeddings through the official openai client ---------------------------------------------

@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-embed-server")
    save_tiny("qwen3", path)
    server = ServerProcess("--model", str(path), "--served-model-name", "tiny")
    yield path, server
    server.stop()


def test_openai_embeddings(tiny_server):
    path, server = tiny_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    ids = AutoTokenizer.from_pretrained(path)(TEXTS)["input_ids"]
    ref = reference_embeddings(path, ids, "last")

    one = client.embeddings.create(model="tiny", input=TEXTS[0], encoding_format="float")
    assert len(one.data) == 1 and one.data[0].index == 0
    assert cosines(one.data[0].embedding, ref[0]) >= 0.9999
    assert one.usage.prompt_tokens == len(ids[0])

    many = client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
    assert [d.index for d in many.data] == list(range(len(TEXTS)))
    assert cosines([d.embedding for d in many.data], ref).min() >= 0.9999
    assert many.usage.prompt_tokens == sum(map(len, ids))

    # The client's default is base64 (little-endian float32), which it decodes itself; check the raw bytes too.
    decoded = client.embeddings.create(model="tiny", input=TEXTS)
    assert cosines([d.embedding for d in decoded.data], ref).min() >= 0.9999
    raw = client.embeddings.with_raw_response.create(model="tiny", input=TEXTS[1], encoding_format="base64").http_response.json()
    vector = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert cosines(vector, ref[1]) >= 0.9999

    short = client.embeddings.create(model="tiny", input=TEXTS, dimensions=16, encoding_format="float")
    assert all(len(d.embedding) == 16 for d in short.data)
    assert cosines([d.embedding for d in short.data], reference_embeddings(path, ids, "last", 16)).min() >= 0.9999

    mean = client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float", extra_body={"pooling": "mean"})
    assert cosines([d.embedding for d in mean.data], reference_embeddings(path, ids, "mean")).min() >= 0.9999

    tokens = client.embeddings.create(model="tiny", input=ids, encoding_format="float")  # token arrays as input
    assert cosines([d.embedding for d in tokens.data], ref).min() >= 0.9999


def test_openai_embeddings_errors(tiny_server):
    _, server = tiny_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="tiny", input="x", dimensions=100_000)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.embeddings.create(model="tiny", input=[[1] * 1000])
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="tiny", input=[])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other", input="x")
    assert server.health()["status"] == "ok"
