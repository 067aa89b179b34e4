"""The official OpenAI Python client against a real `visreg-hub serve` app: what an OpenAI-embeddings user
writes works unchanged (the client sends base64 by default, reads `usage`, maps 4xx to its exceptions)."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.serving.helpers import ThreadServer, png_bytes
from visreg_hub.serving.config import ModelSpec, ServeConfig

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from visreg_hub import from_pretrained

    return from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def client(model, tiny_model_dir):
    from visreg_hub.serving.app import create_app
    from visreg_hub.serving.runtime import runtime_from_model

    config = ServeConfig(models=(ModelSpec("tiny", str(tiny_model_dir)),), max_batch_size=8, max_wait_ms=2.0)
    app = create_app(config, runtimes={"tiny": runtime_from_model("tiny", model, str(tiny_model_dir))})
    with ThreadServer(app) as running:
        yield openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)


def test_embeddings_create_equals_encode(client, model, fmnist_images, photo_bytes):
    payloads = [png_bytes(fmnist_images[0]), photo_bytes[0]]
    inputs = [base64.b64encode(p).decode() for p in payloads]
    response = client.embeddings.create(model="tiny", input=inputs)  # the client asks for base64
    assert response.model == "tiny" and [d.index for d in response.data] == [0, 1]
    got = np.asarray([d.embedding for d in response.data], dtype=np.float32)
    np.testing.assert_array_equal(got, model.encode(payloads, convert_to_numpy=True))
    as_float = client.embeddings.create(model="tiny", input=inputs[0], encoding_format="float")
    np.testing.assert_array_equal(np.asarray(as_float.data[0].embedding, np.float32), got[0])


def test_dimensions_and_errors_through_the_client(client, model, fmnist_images):
    payload = png_bytes(fmnist_images[1])
    encoded = base64.b64encode(payload).decode()
    dims = model.embedding_dim() // 2
    response = client.embeddings.create(model="tiny", input=[encoded], dimensions=dims)
    got = np.asarray(response.data[0].embedding, np.float32)
    expected = model.encode([payload], truncate_dim=dims, convert_to_numpy=True)[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
    with pytest.raises(openai.NotFoundError, match="unknown model") as info:
        client.embeddings.create(model="nope", input=[encoded])
    assert info.value.code == "model_not_found" and info.value.param is None
    with pytest.raises(openai.UnprocessableEntityError, match="URLs and file paths are not accepted"):
        client.embeddings.create(model="tiny", input=["https://example.com/cat.jpg"])
    assert [m.id for m in client.models.list()] == ["tiny"]
    retrieved = client.models.retrieve("tiny")
    assert retrieved.id == "tiny" and retrieved.model_extra["embedding_dim"] == model.embedding_dim()
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        client.models.retrieve("nope")


def test_on_error_raise_through_the_client(client, fmnist_images):
    """OpenAI-client code (LangChain's, LlamaIndex's embedders) pairs response.data with its inputs by
    position and cannot pass extra fields: by default a bad image fails the call, as on OpenAI, instead
    of shifting every later vector by one; "skip" is asked for explicitly."""
    encoded = base64.b64encode(png_bytes(fmnist_images[1])).decode()
    inputs = [encoded, base64.b64encode(b"not an image").decode(), encoded]
    with pytest.raises(openai.UnprocessableEntityError, match="1 of 3 inputs could not be embedded") as info:
        client.embeddings.create(model="tiny", input=inputs)
    assert info.value.code == "input_not_embedded"
    skipped = client.embeddings.create(model="tiny", input=inputs, extra_body={"on_error": "skip"})
    assert [d.index for d in skipped.data] == [0, 2]
    # unset optional fields written out as null (as some clients do) mean the defaults
    nulls = {"encoding_format": None, "on_error": None, "dimensions": None, "user": None}
    assert len(client.embeddings.create(model="tiny", input=[encoded], extra_body=nulls).data) == 1
