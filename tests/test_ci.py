"""`tests.support.ci.in_ci`: any set CI value but an explicit "no" makes a missing service a failure, not a skip."""

from __future__ import annotations

import pytest

from tests.support.ci import in_ci, unavailable


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


def test_a_missing_service_fails_under_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every suite turns a missing service or tool into a skip or a failure through tests.support.ci.unavailable,
    which asks in_ci."""
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        unavailable("Redis", "refused")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="Redis not available: refused"):
        unavailable("Redis", "refused")
