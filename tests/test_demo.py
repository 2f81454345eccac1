"""`veil demo`'s pieces: the attack rate at the SDK's default from the evaluation's record, or that it is not
measured at this setting."""

import json

from app import cli
from client_sdk.accounting import privacy_report
from client_sdk.mechanism import MechanismParams

POINT = {"bits": 4, "dim": 72, "mu": 4.9, "epsilon_per_token": 32.0, "attack": "prior-ml", "recovery": 0.051,
         "recovery_content": 0.0, "target": 0.05, "corpus": "wikitext-2-test", "command": "x",
         "sdk_default": {"mu": 4.0, "epsilon_per_token": 24.3, "attack": "prior-ml", "recovery": 0.031,
                         "recovery_se": 0.004, "recovery_content": 0.002}}


def test_the_attack_rate_is_read_from_the_operating_point_or_said_to_be_unmeasured(tmp_path, monkeypatch) -> None:
    report = privacy_report(MechanismParams.from_mu(4.0, bits=4, dim=72, clip=2.0), 3)
    monkeypatch.setattr(cli, "OPERATING_POINT", tmp_path / "operating-point.json")
    assert "not measured" in cli._measured_recovery(report)
    (tmp_path / "operating-point.json").write_text(json.dumps(POINT))
    line = cli._measured_recovery(report)
    assert "3.1%" in line and "at this setting" in line and "prior-ml" in line
    other = privacy_report(MechanismParams.from_mu(2.0, bits=4, dim=72, clip=2.0), 3)
    assert "not measured at this setting" in cli._measured_recovery(other)
