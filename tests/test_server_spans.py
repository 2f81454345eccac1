"""The server's side of wire v2: public spans embedded with the model's own table, in order; bad ids refused."""

import numpy as np
import torch
from fastapi.testclient import TestClient

from app.api import create_app
from client_sdk import wire
from client_sdk.mechanism import MechanismParams


def mixed_payload(pid: str, public_ids: list[int]) -> bytes:
    params = MechanismParams.from_mu(4.0, bits=4, dim=8, clip=2.0)
    levels = np.random.default_rng(0).integers(0, 16, size=(2, 8), dtype=np.uint8)
    spans = (wire.Span(False, 1), wire.Span(True, 2), wire.Span(False, len(public_ids) - 1))
    return wire.encode(wire.Payload(params, pid, levels, public_ids=np.array(public_ids), spans=spans))


def test_public_spans_use_the_models_table_in_order_and_ids_are_checked(settings, runner) -> None:
    app = create_app(settings, runner=runner)
    with TestClient(app) as http:
        pid = http.get("/v1/bundle").json()["defaults"]["projection_id"]
        body = mixed_payload(pid, [1, 5, 6, 7])
        prepared = app.state.service.prepare(body)
        table = runner.input_embeddings.detach()
        assert prepared.embeddings.shape[0] == 6 and prepared.private_tokens == 2 and prepared.soft_prompt is None
        assert torch.equal(prepared.embeddings[0], table[1])
        assert torch.equal(prepared.embeddings[3:], table[[5, 6, 7]])
        assert not torch.equal(prepared.embeddings[1], table[5])  # private rows are reconstructions
        ok = http.post("/v1/generate", params={"max_new_tokens": 2}, content=body,
                       headers={"Content-Type": "application/octet-stream"})
        assert ok.status_code == 200, ok.text
        bad = http.post("/v1/generate", content=mixed_payload(pid, [1, 5, 6, 10_000]),
                        headers={"Content-Type": "application/octet-stream"})
    assert bad.status_code == 400 and bad.json()["error"] == "bad_payload"
    assert "outside the vocabulary" in bad.json()["detail"]
