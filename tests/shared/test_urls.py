"""A URL's password never reaches a message: ``shown`` and the CLIs that quote a server URL."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from layerlock.license_server.cli import main as layerlock_main
from layerlock.shared.urls import shown
from layerlock.verifier.cli import main as verifier_main


@pytest.mark.parametrize(("url", "want"), [
    ("https://ops:s3cret@h.example:8700/api?token=t#f", "https://h.example:8700/api"),
    ("http://ops@h", "http://h"),
    ("http://[::1]:9/h", "http://[::1]:9/h"),
    ("http://h:99999", "<unparsable URL>"),
    ("http://a:s3cret@h:x", "<unparsable URL>"),
    ("notaurl", "notaurl"),
    ("ops:s3cret@127.0.0.1:9", "…@127.0.0.1:9"),  # no scheme: urlsplit sees no netloc
    ("http:/ops:s3cret@127.0.0.1:9", "…@127.0.0.1:9"),
])
def test_shown_drops_credentials_query_and_fragment(url, want):
    assert shown(url) == want


def test_an_unreachable_server_is_named_without_its_password(tmp_path):
    out = CliRunner().invoke(layerlock_main, ["machines", "list", "--server", "http://admin:s3cret@127.0.0.1:9",
                                              "--api-key", "k"])
    assert out.exit_code == 1 and "cannot reach http://127.0.0.1:9" in out.output, out.output
    assert "s3cret" not in out.output
    out = CliRunner().invoke(verifier_main, ["enroll", "--state-dir", str(tmp_path / "state"), "--server",
                                             "http://host:s3cret@127.0.0.1:9"])
    assert out.exit_code == 1 and "license server http://127.0.0.1:9 unreachable" in out.output, out.output
    assert "s3cret" not in out.output
