"""Schema fuzzing of every endpoint, in process (Schemathesis over the app's OpenAPI): never a 5xx, and every
rejection a JSON error. The admin routes are fuzzed with the admin key; the payload endpoint gets random bytes."""

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
                              admin_key=SecretStr("s3cret"), rate_limit_per_minute=1_000_000)
    app = create_app(settings, runner=tiny_runner())
    with TestClient(app):  # runs the lifespan: the model and the job manager are up while the module runs
        yield app


def check(case) -> None:
    response = case.call(headers=KEY)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert body["error"] and body["detail"], response.text


def test_no_endpoint_answers_5xx_or_a_non_json_error(app) -> None:
    # Each operation driven by Hypothesis directly (Schemathesis's pytest plugin does not support this pytest).
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20 and any(op.path == "/v1/generate" for op in operations)
    for operation in operations:
        fuzz = given(case=operation.as_strategy())(check)
        hypothesis_settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck),
                            database=None)(fuzz)()
