"""The red team's findings (issue 24), device side and the server's bound on A: the device trusts nothing it gets
from the server. Each test fails against the code before its fix."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.api import create_app
from client_sdk import BundleError, VeilError, wire
from client_sdk.mechanism import MechanismParams, max_scale
from tests.test_client import make_client, server  # noqa: F401 (a fixture)


@pytest.mark.parametrize("mu", [1e-300, -1.0, 0.0])
def test_an_unusable_suggested_mu_is_a_bundle_error_and_nothing_is_sent(server, tmp_path, mu) -> None:
    server.info.defaults.mu = mu
    with pytest.raises(BundleError, match=f"suggests mu={mu:g}.*nothing was sent"):
        make_client(server, tmp_path).generate("paris")
    assert server.generate_requests() == []


def test_the_server_refuses_a_scale_the_mechanism_never_produces(settings, runner) -> None:
    with TestClient(create_app(settings, runner=runner)) as http:
        info = http.get("/v1/bundle").json()
        pid, dim, clip = info["defaults"]["projection_id"], info["projections"][0]["dim"], info["projections"][0]["clip"]

        def send(scale: float) -> int:
            params = MechanismParams(bits=4, dim=dim, clip=clip, scale=scale)
            body = wire.encode(wire.Payload(params, pid, np.zeros((2, dim), dtype=np.uint8)))
            return http.post("/v1/generate", params={"max_new_tokens": 1}, content=body,
                             headers={"content-type": "application/octet-stream"})

        refused = send(3e38)
        assert refused.status_code == 400 and "largest the mechanism produces" in refused.json()["detail"]
        assert send(max_scale(4, dim, clip)).status_code == 200  # the loosest A the SDK can produce still passes
