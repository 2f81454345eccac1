"""`veil demo`'s pieces: the attack rate from the evaluation's operating point, or that it is not measured."""

import json

from app import cli
from client_sdk.mechanism import MechanismParams
from client_sdk.accounting import privacy_report

POINT = {"bits": 4, "dim": 72, "mu": 4.0, "epsilon_per_token": 24.26, "attack": "ML + unigram prior",
         "recovery": 0.05, "recovery_content": 0.04, "target": 0.05, "corpus": "wikitext-2-test", "command": "x"}


def test_the_attack_rate_is_read_from_the_operating_point_or_said_to_be_unmeasured(tmp_path, monkeypatch) -> None:
    report = privacy_report(MechanismParams.from_mu(4.0, bits=4, dim=72, clip=2.0), 3)
    monkeypatch.setattr(cli, "OPERATING_POINT", tmp_path / "operating-point.json")
    assert "not measured" in cli._measured_recovery(report)
    (tmp_path / "operating-point.json").write_text(json.dumps(POINT))
    line = cli._measured_recovery(report)
    assert "5.0%" in line and "at this setting" in line and "ML + unigram prior" in line
    other = privacy_report(MechanismParams.from_mu(2.0, bits=4, dim=72, clip=2.0), 3)
    assert "not this one" in cli._measured_recovery(other)
