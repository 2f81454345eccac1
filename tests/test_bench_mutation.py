"""How `veil bench mutation` classifies surviving mutants and scores a module."""

import argparse

import pytest

from bench.mutation import module_name, reason_for, rescored


def diff(removed: str, added: str, context: str = "") -> str:
    return "\n".join(["--- m.py", "+++ m.py", "@@ -1,2 +1,2 @@", *([f" {context}"] if context else []),
                      f"-{removed}", f"+{added}"])


def test_only_the_text_of_a_raised_message_is_message_wording() -> None:
    wording = diff('    raise ValueError("no messages")', '    raise ValueError("XXno messagesXX")')
    assert reason_for("m.x_f__mutmut_1", wording, {}).startswith("message wording (auto)")
    # the same change outside a message, or to a key, or to something other than a string, is not
    assert reason_for("m.x_f__mutmut_2", diff('    mode = "noise"', '    mode = "XXnoiseXX"'), {}) == "UNEXPLAINED"
    keyed = diff('    raise ValueError(d["detail"])', '    raise ValueError(d["XXdetailXX"])')
    assert reason_for("m.x_f__mutmut_3", keyed, {}) == "UNEXPLAINED"
    assert reason_for("m.x_f__mutmut_4", diff('    raise ValueError("x")', '    raise ValueError(None)'), {}) == \
        "UNEXPLAINED"


def test_only_the_letter_case_of_sql_is_equivalent() -> None:
    case = diff('    db.execute("SELECT spent FROM ledger WHERE key = \'a\'")',
                '    db.execute("select spent from ledger where key = \'a\'")')
    assert reason_for("m.x_f__mutmut_1", case, {}).startswith("equivalent (auto)")
    value = diff('    db.execute("SELECT spent FROM ledger WHERE key = \'a\'")',
                 '    db.execute("select spent from ledger where key = \'A\'")')
    assert reason_for("m.x_f__mutmut_2", value, {}) == "UNEXPLAINED"  # a quoted value is data, not SQL


def test_a_written_reason_applies_only_while_the_mutant_makes_the_same_change() -> None:
    reasons = {"m.x_f__mutmut_1": {"change": "n = 2", "reason": "equivalent: n is only compared with 0"}}
    assert reason_for("m.x_f__mutmut_1", diff("    n = 1", "    n = 2"), reasons) == "equivalent: n is only compared with 0"
    # renumbered after an edit: the name now belongs to another mutant
    assert reason_for("m.x_f__mutmut_1", diff("    n = 1", "    n = None"), reasons) == "UNEXPLAINED"
    # a mutant that only deletes (an argument) is matched on its removed line
    deleting = {"m.x_g__mutmut_1": {"change": "f(a, b)", "reason": "harmless: b is f's default"}}
    assert reason_for("m.x_g__mutmut_1", "--- m.py\n+++ m.py\n-    f(a, b)", deleting) == "harmless: b is f's default"


def test_equivalent_survivors_leave_the_score_and_explained_ones_count_as_caught() -> None:
    survivors = [{"reason": "equivalent: x"}, {"reason": "harmless: y"}, {"reason": "UNEXPLAINED"}]
    r = rescored({"checked": 20, "killed": 17, "survivors": survivors})
    assert (r["equivalent"], r["unexplained"]) == (1, 1)
    assert r["score_without_equivalent"] == round(17 / 19, 4)
    assert r["score_with_explained"] == round(19 / 20, 4)


def test_a_module_is_named_by_its_key_or_by_a_file_of_it() -> None:
    assert module_name("client_sdk/accounting/*.py") == module_name("client_sdk/accounting/binomial.py") == \
        "client_sdk/accounting/*.py"  # what the shell makes of an unquoted glob
    assert module_name("app/access.py") == "app/access.py"
    with pytest.raises(argparse.ArgumentTypeError, match="not one of the modules mutated"):
        module_name("app/admin.py")
