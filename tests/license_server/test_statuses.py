"""The one code → HTTP status table: every error the product raises on purpose has its status."""

from __future__ import annotations

import inspect

import pytest

from layerlock.license_server.statuses import status_of
from layerlock.shared import errors
from layerlock.shared.errors import ActivationDenied, ClaimRefused, Denial, LayerlockError


def test_shared_errors_know_no_http():
    assert not any(hasattr(cls, "http_status") for _, cls in inspect.getmembers(errors, inspect.isclass))


@pytest.mark.parametrize("cls", [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
                                 if issubclass(cls, LayerlockError) and cls not in (
                                     LayerlockError, ActivationDenied, ClaimRefused)])
def test_every_error_class_maps_to_a_4xx_or_a_deliberate_5xx(cls):
    """Client mistakes are 4xx; only configuration and outages (Redis down, a write not
    replicated, a request shed) are 5xx."""
    status = status_of(cls("x", 1.0) if cls is errors.RetryLater else cls("x"))
    assert 400 <= status < 600
    if issubclass(cls, (errors.ConfigError, errors.Unavailable, errors.VerifierError)):
        assert status in (500, 503)
    else:
        assert status < 500, cls


@pytest.mark.parametrize("reason, status", [(Denial.BAD_SIGNATURE, 401), (Denial.NOT_ENROLLED, 401),
                                            (Denial.STALE_REQUEST, 401), (Denial.REPLAY, 409),
                                            (Denial.RATE_LIMITED, 429), (Denial.BUSY, 503), (Denial.REVOKED, 403),
                                            (Denial.SUITE_REQUIRED, 403), (Denial.NO_LICENSE, 403)])
def test_denial_statuses(reason, status):
    assert status_of(ActivationDenied(reason, "m")) == status


def test_claim_statuses():
    assert status_of(ClaimRefused("bad_claim", "m")) == 401
    assert status_of(ClaimRefused("claim_used", "m")) == 409
