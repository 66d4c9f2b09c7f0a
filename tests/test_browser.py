"""The admin in a real browser: headless Chromium from Debian packages, driven by Selenium through
``/usr/bin/chromedriver`` (nothing is downloaded), against pytest-django's live server.

Never skipped: scripts/test-setup (the README's test command) installs ``chromium`` and
``chromium-driver`` when they are missing, and a machine without them fails here with the
command to install them.

Screenshots are kept as test artefacts, in ``test-artifacts/screenshots/`` (ignored by git) or
the directory named by ``RUNS_APP_SCREENSHOTS``.
"""

from __future__ import annotations

import os
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
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from runs_app.models import RunOutbox
from tests.factories import RunFactory

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = Path(
    os.environ.get("RUNS_APP_SCREENSHOTS")
    or Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots"
)
#: The width the run list must fit without scrolling sideways.
SCREEN_WIDTH = 1400
WAIT_SECONDS = 30


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    assert not missing, (
        f"{', '.join(missing)} missing: apt-get update && apt-get install -y chromium "
        "chromium-driver (scripts/test-setup installs them)"
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
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={SCREEN_WIDTH},1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(browser: WebDriver, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    assert browser.save_screenshot(str(path)), path
    return path


def log_in(browser: WebDriver, live_server: LiveServer, next_url: str) -> WebDriverWait[WebDriver]:
    User.objects.create_superuser("operator", "operator@example.com", "s3cret-pass")
    wait = WebDriverWait(browser, WAIT_SECONDS)
    browser.get(f"{live_server.url}/admin/login/?next={next_url}")
    wait.until(ec.presence_of_element_located((By.ID, "id_username"))).send_keys("operator")
    browser.find_element(By.ID, "id_password").send_keys("s3cret-pass")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    return wait


def scroll_overflow(browser: WebDriver, element: WebElement | None = None) -> int:
    """How many pixels the page (or ``element``) would need to scroll sideways; 0 if none."""
    target = "arguments[0]" if element is not None else "document.scrollingElement"
    return int(
        browser.execute_script(f"return {target}.scrollWidth - {target}.clientWidth;", element)
    )


def in_view(browser: WebDriver, element: WebElement) -> bool:
    """Shown, and wholly inside the window's width."""
    rect = browser.execute_script(
        "const r = arguments[0].getBoundingClientRect();"
        "return {left: r.left, right: r.right, width: window.innerWidth};",
        element,
    )
    return element.is_displayed() and rect["left"] >= 0 and rect["right"] <= rect["width"]


@pytest.mark.django_db(transaction=True)
def test_run_list_and_a_blocked_run_fit_1400_px(
    browser: WebDriver, live_server: LiveServer
) -> None:
    # Runs in every state, with ids as long as generated ones (uuid4 hex).
    RunFactory(scope="nightly-projects", id="4f0c2d1e9b8a47c6a1d2e3f405162738", events=3)
    RunFactory(scope="weekly-projects", id="run-ok-1", completed=True, cleaned=True)
    RunFactory(scope="crm-sync", id="run-failed-1", flush_failed=True)
    blocked = RunFactory(scope="repositories", id="run-blocked-1", events=2, blocked=True)
    RunFactory(scope="big-import", id="run-big-1", events=40, completed=True, leased=True)

    wait = log_in(browser, live_server, "/admin/runs_app/run/")
    table = wait.until(ec.presence_of_element_located((By.ID, "result_list")))
    assert len(table.find_elements(By.CSS_SELECTOR, "tbody tr")) == 5
    screenshot(browser, "admin-run-list")

    assert scroll_overflow(browser) <= 0, "the run list scrolls sideways"
    results = browser.find_element(By.CSS_SELECTOR, "#changelist-form .results")
    assert scroll_overflow(browser, results) <= 0, "the run table scrolls sideways"
    headers = table.find_elements(By.CSS_SELECTOR, "thead th")
    assert [header.text for header in headers[1:]] == [
        "ID",
        "SCOPE",
        "STATUS",
        "STARTED",
        "DURATION",
        "DELIVERY",
    ]
    hidden = [header.text for header in headers if not in_view(browser, header)]
    assert hidden == []
    # A time is one line, with seconds and its zone.
    started = table.find_element(By.CSS_SELECTOR, "td.field-started time")
    assert started.text.endswith(" UTC") and len(started.text) == len("2026-12-02 15:04:05 UTC")
    assert started.size["height"] < 2 * float(started.value_of_css_property("font-size")[:-2])
    # One red "blocked" badge, on the blocked run's row.
    badges = table.find_elements(By.CSS_SELECTOR, "td.field-delivery .runs-badge")
    assert [badge.text.lower() for badge in badges] == ["blocked"]
    row = badges[0].find_element(By.XPATH, "./ancestor::tr")
    assert "run-blocked-1" in row.text
    assert badges[0].value_of_css_property("background-color") == "rgba(198, 40, 40, 1)"

    # The outbox list fits too, with the same delivery column.
    browser.get(f"{live_server.url}/admin/runs_app/runoutbox/")
    outboxes = wait.until(ec.presence_of_element_located((By.ID, "result_list")))
    screenshot(browser, "admin-outbox-list")
    assert scroll_overflow(browser) <= 0, "the outbox list scrolls sideways"
    results = browser.find_element(By.CSS_SELECTOR, "#changelist-form .results")
    assert scroll_overflow(browser, results) <= 0, "the outbox table scrolls sideways"
    assert all(in_view(browser, th) for th in outboxes.find_elements(By.CSS_SELECTOR, "thead th"))
    assert len(outboxes.find_elements(By.CSS_SELECTOR, "td.field-delivery .runs-badge")) == 1

    # The blocked run's page: the banner says what is wrong and what to do.
    browser.get(f"{live_server.url}/admin/runs_app/run/")
    table = wait.until(ec.presence_of_element_located((By.ID, "result_list")))
    row = table.find_element(By.CSS_SELECTOR, "td.field-delivery .runs-badge").find_element(
        By.XPATH, "./ancestor::tr"
    )
    row.find_element(By.LINK_TEXT, "run-blocked-1").click()
    banner = wait.until(ec.visibility_of_element_located((By.ID, "runs-banner-blocked")))
    screenshot(browser, "admin-blocked-run")
    assert in_view(browser, banner)
    assert "Delivery is blocked at event seq 1 (run.started)." in banner.text
    assert "broker down <script>alert('x')</script>" in banner.text
    assert "Retry delivery now" in banner.text and "Skip blocked event" in banner.text
    assert scroll_overflow(browser) <= 0, "the run page scrolls sideways"
    buttons = browser.find_elements(By.CSS_SELECTOR, ".object-tools button.runs-tool")
    assert [button.text.lower() for button in buttons] == [
        "retry delivery now",
        "skip blocked event",
        "mark failed",
    ]

    # Retry delivery now: the banner is gone, the run is claimable.
    browser.find_element(By.ID, "runs-retry-delivery").click()
    success = wait.until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, ".messagelist .success"))
    )
    assert success.text == "Delivery retried now for 1 run(s): run-blocked-1."
    assert browser.find_elements(By.ID, "runs-banner-blocked") == []
    screenshot(browser, "admin-retry-delivery")
    outbox = RunOutbox.objects.get(pk=blocked.pk)
    assert (outbox.blocked_at, outbox.attempts) == (None, 0)


@pytest.mark.django_db(transaction=True)
def test_operator_marks_a_run_failed_after_confirming(
    browser: WebDriver, live_server: LiveServer
) -> None:
    run = RunFactory(scope="crm-sync", id="run-stuck-1")
    wait = log_in(browser, live_server, f"/admin/runs_app/run/{run.pk}/change/")
    wait.until(ec.element_to_be_clickable((By.ID, "runs-mark-failed"))).click()

    confirm = wait.until(ec.visibility_of_element_located((By.ID, "runs-confirm")))
    assert "run-stuck-1" in browser.find_element(By.ID, "runs-fail-runs").text
    screenshot(browser, "admin-mark-failed-confirmation")
    run.state.refresh_from_db()
    assert run.state.status == "active"  # asked, not done
    confirm.click()

    banner = wait.until(ec.visibility_of_element_located((By.ID, "runs-banner-failed")))
    assert "This run failed (marked_failed)." in banner.text
    assert "Marked failed in the admin by operator." in banner.text
    assert browser.find_elements(By.ID, "runs-mark-failed") == []
    run.state.refresh_from_db()
    assert run.state.status == "failed"
