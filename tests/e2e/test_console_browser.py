"""The ops console in a real headless Chromium against a real gunicorn + Redis.

Debian's ``chromium`` and ``chromium-driver`` packages (installed by ``deploy/ensure-test-tools.sh``
as root: ``make test`` on a fresh machine), driven by selenium with the driver path given
explicitly, so Selenium Manager never downloads anything.  Sign in, issue a license, revoke it
through the confirm dialog, see the audit record, see an auditor refused a forged write,
check escaping, phone width and accessibility (axe-core, as shipped by ``axe-core-python``).

Before the server starts, Redis is seeded with a day of activation history (correctly
hash-chained, with stream ids in the past) so the dashboard's chart has something to show; the
chain verifies like any other.  ``LAYERLOCK_SCREENSHOTS=1`` writes the README's screenshots to
``docs/`` (otherwise they go to the test's temporary directory).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import shutil
import tempfile
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from tests.conftest import REPO, LicenseServer, RedisServer, wait_for
from tests.license_server.ls_helpers import Machine, activate, add_model, issue, new_machine, register

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PAGES = ("", "machines", "licenses", "models", "audit", "audit/verify", "keys")
EVIL = "<script>alert(1)</script>"


def _dumps(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def seed_history(r: Any, machines: list[Machine], model: str, hours: int = 24) -> int:
    """A plausible day of activation records (the server's own record shape), chained from genesis."""
    rng = random.Random(7)
    now = time.time()
    prev, n = "0" * 64, 0
    t = now - hours * 3600
    while True:
        hour = int((t % 86400) // 3600)
        busy = 14 + 10 * (8 <= hour <= 18)  # office hours are busier
        t += rng.expovariate(busy / 3600)
        if t >= now - 120:
            break
        m = rng.choice(machines)
        if rng.random() < 0.9:
            fields = {"outcome": "granted", "license": "lic_" + secrets.token_hex(8),
                      "suite": "X25519-SHA256-AES256GCM", "jti": secrets.token_hex(12)}
        else:
            fields = {"outcome": "denied", "reason": rng.choice(["expired", "expired", "revoked", "no_license",
                                                                  "machine_inactive"])}
        body = {"type": "activation", "ts": round(t, 3), "actor": "", "machine": m.code, "model": model,
                "ip": f"10.0.{rng.randint(0, 3)}.{rng.randint(2, 250)}", **fields, "prev": prev}
        canonical = _dumps(body)
        prev = hashlib.sha256(canonical.encode()).hexdigest()
        r.xadd("{ll}:audit", {"rec": canonical, "h": prev}, id=f"{int(t * 1000)}-{n}")  # two in one ms: n grows
        n += 1
    r.set("{ll}:audit:head", prev)
    return n


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("console")
    rs = RedisServer(base / "redis")
    rs.start()
    fleet = [new_machine(vendor=v) for v in ("Nvidia", "Nvidia", "Intel", "AMD", "Nvidia")]
    seeded = seed_history(rs.client(), fleet, "resnet-3")
    ls = LicenseServer(base / "server", rs.url)
    try:
        ls.start()
        for m, (customer, site) in zip(fleet, [("acme", "berlin"), ("acme", "austin"), ("globex", "lyon"),
                                               ("initech", "osaka"), ("umbrella", "berlin")], strict=True):
            register(ls, m, customer=customer, labels={"site": site, "tier": "gpu"})
        add_model(ls, "resnet-3")
        add_model(ls, "bert-base-2")
        for m in fleet[:4]:
            issue(ls, m, "resnet-3", days=365)
        issue(ls, fleet[0], "bert-base-2", days=10)
        for m in fleet[:3]:
            assert activate(ls, m, "resnet-3").status_code == 200
        assert activate(ls, fleet[4], "resnet-3").status_code == 403  # no license: an audited denial
        for _ in range(3):  # unknown machines: refused, counted, not audited
            assert activate(ls, new_machine(), "resnet-3").status_code in (401, 403)
        assert ls.api("GET", "/v1/audit/checkpoint").status_code == 200
        ls.seeded = seeded  # type: ignore[attr-defined]
        ls.fleet = fleet  # type: ignore[attr-defined]
        yield ls
    finally:
        ls.stop()
        rs.kill()


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: apt-get install chromium chromium-driver "
                    "(deploy/ensure-test-tools.sh does it as root; `make test` runs that)")
    profile = tempfile.mkdtemp(prefix="ll-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
                f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)  # no Selenium Manager: path given
    driver.set_window_size(1280, 800)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def sign_in(d: webdriver.Chrome, url: str, key: str) -> None:
    d.delete_all_cookies()
    d.get(url + "/console/login")
    d.find_element(By.ID, "api_key").send_keys(key)
    d.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    assert wait_for(lambda: d.find_elements(By.CSS_SELECTOR, ".who-name"), 10), d.page_source[:500]
    loaded(d)


def loaded(d: webdriver.Chrome) -> None:
    """Wait for the page's deferred console.js to have run (the Revoke button's confirm handler)."""
    assert wait_for(lambda: d.execute_script("return document.readyState") == "complete", 10)


def heading(d: webdriver.Chrome) -> str:
    """The page's ``h1``, or "" while a navigation replaces the page."""
    try:
        return d.find_element(By.TAG_NAME, "h1").text
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def flash_after_submit(d: webdriver.Chrome, expected: str) -> None:
    """Wait for the ok flash saying ``expected`` on the page a form post led to.

    ``click()`` returns before the next page loads, and the page clicked on may itself carry an
    older flash, so this waits for the text, not for any flash.
    """
    def seen() -> list[str]:
        try:
            return [f"{e.get_attribute('class')}: {e.text}" for e in d.find_elements(By.CSS_SELECTOR, ".flash")]
        except StaleElementReferenceException:  # the page changed between finding and reading
            return []

    assert wait_for(lambda: any("flash-ok" in f and expected in f for f in seen()), 10), seen()
    loaded(d)


def csp_errors(d: webdriver.Chrome) -> list[str]:
    return [e["message"] for e in d.get_log("browser")
            if e["level"] == "SEVERE" or "Content Security Policy" in e["message"]]


def shot(d: webdriver.Chrome, name: str, tmp_path: Path, max_height: int = 1300) -> Path:
    """A full-page PNG (the window stretched to the page's height) in docs/ or tmp_path."""
    out = (REPO / "docs" if os.environ.get("LAYERLOCK_SCREENSHOTS") == "1" else tmp_path) / f"console-{name}.png"
    out.parent.mkdir(exist_ok=True)
    width = d.get_window_size()["width"]
    height = min(max_height, d.execute_script("return document.documentElement.scrollHeight") + 100)
    d.set_window_size(width, max(800, height))
    try:
        assert d.save_screenshot(str(out))
    finally:
        d.set_window_size(width, 800)
    assert out.stat().st_size > 10_000
    return out


def test_admin_issues_and_revokes_a_license_and_sees_the_audit_record(stack, browser, tmp_path):
    d, url = browser, stack.url
    sign_in(d, url, stack.admin_key)
    assert "Dashboard" in d.title
    text = d.find_element(By.TAG_NAME, "main").text
    checked = int(text.split("Chain intact: ", 1)[1].split(" records", 1)[0])
    assert checked > stack.seeded  # the seeded day and everything since verify as one chain
    bars = d.find_elements(By.CSS_SELECTOR, "svg.chart rect.bar-granted")
    assert len(bars) >= 20  # a day of history, hour by hour
    shot(d, "dashboard", tmp_path)

    d.get(url + "/console/licenses")
    m = stack.fleet[4]
    d.find_element(By.ID, "issue-machine").send_keys(m.code)
    Select(d.find_element(By.ID, "issue-model")).select_by_value("resnet-3")
    days = d.find_element(By.ID, "issue-days")
    days.clear()
    days.send_keys("90")
    d.find_element(By.ID, "issue-notes").send_keys("browser test")
    d.find_element(By.XPATH, "//button[normalize-space()='Issue license']").click()
    flash_after_submit(d, f"License issued for {m.code}")
    lic = stack.api("GET", f"/v1/licenses?machine={m.code}").json()["items"][0]
    assert lic["notes"] == "browser test" and lic["status"] == "active"

    row = d.find_element(By.XPATH, f"//tr[.//code[text()='{lic['license_id']}']]")
    row.find_element(By.NAME, "reason").send_keys("customer churned")
    row.find_element(By.XPATH, ".//button[normalize-space()='Revoke']").click()
    alert = d.switch_to.alert  # the progressive-enhancement confirm dialog
    assert lic["license_id"] in alert.text
    alert.accept()
    flash_after_submit(d, f"License {lic['license_id']} revoked")
    assert stack.api("GET", f"/v1/licenses/{lic['license_id']}").json()["status"] == "revoked"

    d.get(url + "/console/audit")
    newest = d.find_element(By.CSS_SELECTOR, "ol.records li.rec")
    assert "license_revoked" in newest.text and lic["license_id"] in newest.text
    assert "customer churned" in newest.text and "key_bootstrap_" in newest.text
    shot(d, "audit", tmp_path, max_height=1000)
    # the record's predecessor link lands on the license_issued record
    newest.find_element(By.CSS_SELECTOR, "a.prev").click()
    target = d.find_element(By.CSS_SELECTOR, "li.rec:target")
    assert "license_issued" in target.text and lic["license_id"] in target.text
    assert not csp_errors(d)


def test_auditor_sees_no_write_controls_and_a_forged_post_is_refused(stack, browser):
    d, url = browser, stack.url
    auditor = stack.api("POST", "/v1/keys", {"role": "auditor", "name": "audit team"}).json()
    sign_in(d, url, auditor["api_key"])
    for page in ("machines", "licenses", "models"):
        d.get(f"{url}/console/{page}")
        assert not d.find_elements(By.CSS_SELECTOR, "main form[method=post]"), page
        assert not d.find_elements(By.XPATH, "//button[normalize-space()='Revoke' or normalize-space()='Deactivate' "
                                             "or normalize-space()='Issue license' or normalize-space()='Retire']")
    nav = d.find_element(By.CSS_SELECTOR, "nav.nav").text
    assert "Audit" in nav and "API keys" not in nav
    lic = stack.api("GET", "/v1/licenses?status=active").json()["items"][0]
    before = stack.redis().xlen("{ll}:audit")
    # forge the revoke form a writer would see, with this session's own valid CSRF token
    d.execute_script("""
        const token = document.querySelector("input[name=csrf]").value;
        const f = document.createElement("form"); f.method = "post"; f.action = arguments[0];
        for (const [k, v] of [["csrf", token], ["reason", "forged"], ["confirmed", "yes"]]) {
          const i = document.createElement("input"); i.type = "hidden"; i.name = k; i.value = v; f.appendChild(i);
        }
        document.body.appendChild(f); f.submit();""", f"/console/licenses/{lic['license_id']}/revoke")
    assert wait_for(lambda: "Not allowed" in heading(d), 10)
    assert "role auditor may not do this" in d.find_element(By.TAG_NAME, "main").text
    assert stack.redis().xlen("{ll}:audit") == before
    assert stack.api("GET", f"/v1/licenses/{lic['license_id']}").json()["status"] == "active"


def test_a_script_label_renders_as_text(stack, browser):
    d, url = browser, stack.url
    m = new_machine()
    register(stack, m, customer="evil corp", labels={"note": EVIL})
    sign_in(d, url, stack.admin_key)
    d.get(f"{url}/console/machines?q=evil")
    with pytest.raises(NoAlertPresentException):
        d.switch_to.alert.text  # noqa: B018 - no script ran
    chip = d.find_element(By.XPATH, f"//tr[.//code[text()='{m.code}']]//span[contains(@class, 'chip')]")
    assert chip.text == f"note={EVIL}"
    assert not d.find_elements(By.CSS_SELECTOR, "main script")


def test_phone_width_and_accessibility(stack, browser):
    d, url = browser, stack.url
    sign_in(d, url, stack.admin_key)
    axe = (files("axe_core_python") / "axe.min.js").read_text()
    try:
        for width in (1280, 390):
            d.set_window_size(width, 844)
            for page in PAGES:
                d.get(f"{url}/console/{page}")
                overflow = d.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
                assert overflow <= 0, (page, width, overflow)  # wide tables scroll inside their panel
                if width == 390:
                    assert d.find_element(By.CSS_SELECTOR, "nav.nav").is_displayed()
                    continue
                d.execute_script(axe)
                result = d.execute_async_script(
                    "axe.run(document, {resultTypes: ['violations']}).then(arguments[arguments.length - 1]);")
                problems = [(v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3]) for v in result["violations"]]
                assert not problems, (page, problems)
        d.delete_all_cookies()
        d.get(f"{url}/console/login")
        d.execute_script(axe)
        result = d.execute_async_script("axe.run(document).then(arguments[arguments.length - 1]);")
        assert not result["violations"], [v["id"] for v in result["violations"]]
    finally:
        d.set_window_size(1280, 800)
