"""The admin in a real browser: headless Chromium from Debian packages, driven by Selenium through
``/usr/bin/chromedriver`` (nothing is downloaded), against pytest-django's live server.

Never skipped: .ci/run installs ``chromium`` and ``chromium-driver`` when they are missing, and a
machine without them fails here with the command to install them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from pytest_django.live_server_helper import LiveServer
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from runs_app.models import RunOutbox
from tests import scenarios

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
WAIT_SECONDS = 30


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    assert not missing, (
        f"{', '.join(missing)} missing: apt-get update && apt-get install -y chromium "
        "chromium-driver (.ci/run installs them)"
    )
    # Selenium Manager must not look for (or download) a browser or a driver.
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1600,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.django_db(transaction=True)
def test_operator_retries_delivery_of_a_failed_run(
    browser: WebDriver, live_server: LiveServer
) -> None:
    User.objects.create_superuser("operator", "operator@example.com", "s3cret-pass")
    scenarios.completed_run("nightly", "run-ok-1")
    failed = scenarios.failed_flush_run("sync", "run-failed-1")
    scenarios.block_outbox(failed)
    wait = WebDriverWait(browser, WAIT_SECONDS)

    # Log in; the login page sends us on to the run list.
    browser.get(f"{live_server.url}/admin/login/?next=/admin/runs_app/run/")
    wait.until(ec.presence_of_element_located((By.ID, "id_username"))).send_keys("operator")
    browser.find_element(By.ID, "id_password").send_keys("s3cret-pass")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait.until(ec.presence_of_element_located((By.ID, "result_list")))

    # Filter the failed runs.
    browser.find_element(
        By.CSS_SELECTOR, '#changelist-filter a[href*="state__status__exact=failed"]'
    ).click()
    wait.until(ec.url_contains("state__status__exact=failed"))
    rows = wait.until(
        ec.presence_of_all_elements_located((By.CSS_SELECTOR, "#result_list tbody tr"))
    )
    assert len(rows) == 1
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "admin-failed-runs.png"))
    assert "run-failed-1" in rows[0].text and "refused: flush_failed" in rows[0].text

    # Open it: its story is there.
    rows[0].find_element(By.LINK_TEXT, "run-failed-1").click()
    timeline = wait.until(ec.presence_of_element_located((By.ID, "runs-timeline")))
    assert "run.failed" in timeline.text
    page = browser.find_element(By.ID, "content-main").text
    assert "flush_failed" in page and "Blocked since" in page

    # Retry delivery now.
    browser.find_element(By.ID, "runs-retry-delivery").click()
    success = wait.until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, ".messagelist .success"))
    )
    assert success.text == "Delivery retried now for 1 run(s): run-failed-1."
    assert browser.save_screenshot(str(ARTIFACTS / "admin-retry-delivery.png"))

    outbox = RunOutbox.objects.get(pk=failed.pk)
    assert (outbox.blocked_at, outbox.attempts) == (None, 0)
