"""Schema fuzzing of every endpoint, in process (Schemathesis over the app's OpenAPI): never a 5xx, and every
rejection a JSON error. Every route is fuzzed with the admin key, without any key and with a wrong one (an attacker
has none); the payload endpoint gets random bytes."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings as hypothesis_settings
from pydantic import SecretStr

schemathesis = pytest.importorskip("schemathesis")

from app.api import create_app  # noqa: E402
from tests.conftest import tiny_runner  # noqa: E402

KEY = {"Authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from app.settings import ServerSettings

    root = tmp_path_factory.mktemp("fuzz")
    settings = ServerSettings(cache_dir=root / "cache", soft_prompt_dir=root / "soft_prompts",
                              projection_dir=root / "projections", data_dir=root / "data", projection_dim=8,
                              admin_key=SecretStr("s3cret"), rate_limit_per_minute=1_000_000,
                              auth_failures_per_minute=1_000_000, docs=True)
    app = create_app(settings, runner=tiny_runner())
    with TestClient(app):  # runs the lifespan: the model and the job manager are up while the module runs
        yield app


@pytest.fixture(params=["admin key", "no key", "wrong key"])
def headers(request) -> dict[str, str]:
    return {"admin key": KEY, "no key": {}, "wrong key": {"Authorization": "Bearer wrong"}}[request.param]


def checker(headers: dict[str, str]):
    def check(case) -> None:
        response = case.call(headers=headers)
        assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
        if response.status_code >= 400:
            body = response.json()
            assert body["error"] and body["detail"], response.text
        if not headers and case.path.startswith("/admin"):
            assert response.status_code == 401, (case.method, case.path, response.status_code)
    return check


def test_no_endpoint_answers_5xx_or_a_non_json_error(app, headers) -> None:
    # Each operation driven by Hypothesis directly (Schemathesis's pytest plugin does not support this pytest).
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20 and any(op.path == "/v1/generate" for op in operations)
    for operation in operations:
        fuzz = given(case=operation.as_strategy())(checker(headers))
        hypothesis_settings(max_examples=25 if headers == KEY else 10, deadline=None,
                            suppress_health_check=list(HealthCheck),
                            database=None)(fuzz)()
