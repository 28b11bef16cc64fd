"""`tests.ci.in_ci`: any set CI value but an explicit "no" makes a missing service a failure, not a skip."""

from __future__ import annotations

import pytest

from tests.ci import in_ci


@pytest.mark.parametrize("value", ["true", "TRUE", "True", "1", "yes", "YES", "on", " true ", "github"])
def test_ci_is_set_for_every_value_but_an_explicit_no(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci()


@pytest.mark.parametrize("value", ["", "  ", "false", "FALSE", "0", "no", "No", "off"])
def test_ci_is_not_set_for_empty_or_an_explicit_no(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    assert not in_ci()


def test_ci_is_not_set_when_the_variable_is_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    assert not in_ci()


def test_every_conftest_asks_the_one_in_ci() -> None:
    """The conftests that turn a missing service into a skip or a failure all use tests.ci.in_ci."""
    import tests.conftest
    import tests.e2e.conftest

    assert tests.conftest.in_ci is in_ci
    assert vars(tests.e2e.conftest)["in_ci"] is in_ci
