"""The dashboard in a real browser: headless Chromium from the system's packages, driven by Selenium.

Log in, find a dead delivery, replay it with the confirmation, see it delivered after a worker
burst; a script in UserData stays text; no console errors. A screenshot of each page is saved
under the test's tmp_path (pytest prints where when it fails; ``--basetemp`` picks the folder).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from support.pipeline import DONE, Pipeline
from support.receiver import Reply
from support.services import unavailable

from webhook.web.app import create_app
from webhook.web.server import BackgroundServer

PASSWORD = "correct horse battery staple"
# Would set the title, raise an alert and mark the window if the page ever let it run.
SCRIPT = "<script>window.pwned=1;alert('script')</script><img src=x onerror=\"window.pwned=2;alert('img')\">"

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)]


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        unavailable("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    # Both binaries are named, so Selenium Manager has nothing to find; offline, it could fetch nothing anyway.
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    chrome.set_page_load_timeout(30)
    try:
        yield chrome
    finally:
        chrome.quit()


@contextmanager
def logged_in(pipeline: Pipeline, browser: WebDriver) -> Iterator[str]:
    """The dashboard served on a real socket, the browser logged in on its overview; yields its base URL."""
    app = create_app(pipeline.settings.replace(dashboard_password=PASSWORD), pipeline.ledger)
    with BackgroundServer(app, name="dashboard") as server:
        base = server.url + "/dashboard"
        browser.get(base + "/")
        assert browser.current_url.startswith(base + "/login")
        browser.find_element(By.ID, "password").send_keys(PASSWORD)
        navigate(browser, browser.find_element(By.CSS_SELECTOR, "form button[type=submit]"))
        assert browser.current_url == base + "/"
        yield base


def navigate(browser: WebDriver, element: WebElement) -> None:
    """Click a link or a submit button and wait for the next page: a click returns before it loads."""
    page = browser.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(browser, 30).until(expected_conditions.staleness_of(page))


def screenshot(browser: WebDriver, folder: Path, name: str) -> None:
    """The whole page, not only the window: the window grows to the page's height first."""
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, max(1000, min(int(height) + 40, 8000)))
    browser.save_screenshot(str(folder / f"{name}.png"))
    browser.set_window_size(1400, 1000)


def no_script_ran(browser: WebDriver) -> None:
    try:
        alert = browser.switch_to.alert
    except NoAlertPresentException:
        pass
    else:
        text = alert.text
        alert.dismiss()
        raise AssertionError(f"a script from a callback ran: alert({text!r})")
    assert browser.execute_script("return window.pwned") is None


def test_replay_a_dead_delivery_in_the_browser(pipeline: Pipeline, browser: WebDriver, tmp_path: Path) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    pipeline.http.reply(Reply(400))
    job_id = pipeline.submit(pipeline.upload_input(), user_data=SCRIPT)
    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "dead"
    pipeline.ledger.workers.beat("worker-host:4242:cafe0001", "worker-host", 4242)

    with logged_in(pipeline, browser) as base:
        assert browser.find_element(By.TAG_NAME, "h1").text == "Overview"
        screenshot(browser, shots, "1-overview")

        navigate(browser, browser.find_element(By.LINK_TEXT, "Jobs"))
        assert job_id in browser.find_element(By.CSS_SELECTOR, "table.jobs").text
        assert browser.find_element(By.CSS_SELECTOR, "td.user-data").text == SCRIPT
        no_script_ran(browser)
        screenshot(browser, shots, "2-jobs")

        navigate(browser, browser.find_element(By.LINK_TEXT, "Dead letters"))
        row = browser.find_element(By.CSS_SELECTOR, f'tr[data-job="{job_id}"][data-sink="http"]')
        assert "refused permanently" in row.text
        screenshot(browser, shots, "4-dead-letters")
        navigate(browser, row.find_element(By.CSS_SELECTOR, "button.replay-one"))
        assert browser.find_element(By.TAG_NAME, "h1").text == "Replay 1 dead letter?"
        assert pipeline.status(job_id) == "dead"
        screenshot(browser, shots, "5-confirm")
        navigate(browser, browser.find_element(By.ID, "confirm-replay"))
        assert "1 dead letter scheduled again." in browser.find_element(By.CSS_SELECTOR, ".flash").text
        assert pipeline.status(job_id) == "verified"

        pipeline.http.reply(Reply(200))
        worker = pipeline.worker()
        try:
            assert worker.run(burst=True) >= 1
        finally:
            worker.close()
        assert pipeline.status(job_id) == "delivered"

        browser.get(f"{base}/jobs/{job_id}")
        assert browser.find_element(By.ID, "job-status").text == "delivered"
        http_lane = browser.find_element(By.ID, "lane-deliver-http")
        outcomes = [badge.text for badge in http_lane.find_elements(By.CSS_SELECTOR, "td .badge")]
        # The refusal stays in the timeline, the replay is marked where it starts, then it delivered.
        assert outcomes == ["dead", "replayed", "ok"]
        assert browser.find_element(By.CSS_SELECTOR, "dd.user-data").text == SCRIPT
        assert SCRIPT.replace('"', '\\"') in browser.find_element(By.CSS_SELECTOR, "pre.body").text
        no_script_ran(browser)
        screenshot(browser, shots, "3-job-detail")

        navigate(browser, browser.find_element(By.LINK_TEXT, "Workers"))
        assert "worker-host:4242:cafe0001" in browser.find_element(By.TAG_NAME, "table").text
        screenshot(browser, shots, "6-workers")

        browser.get(base + "/dead")
        assert job_id not in browser.find_element(By.TAG_NAME, "main").text

    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == [], severe
    print(f"screenshots: {shots}")


WIDTHS = {"desktop": (1400, 1000), "phone": (390, 844)}


@pytest.mark.parametrize("width", list(WIDTHS))
def test_every_page_fits_the_width_with_log_out_in_reach(
    pipeline: Pipeline, browser: WebDriver, tmp_path: Path, width: str
) -> None:
    pipeline.http.reply(Reply(400))
    job_id = pipeline.submit(pipeline.upload_input(), user_data="a-long-user-data-value-without-spaces-" * 4)
    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "dead"
    pipeline.ledger.workers.beat("a-worker-host-with-a-long-name:4242:cafe0001", "a-worker-host-with-a-long-name", 4242)
    with logged_in(pipeline, browser) as base:
        browser.set_window_size(*WIDTHS[width])
        pages = ["/", "/jobs", f"/jobs/{job_id}", "/dead", "/workers"]
        for page in pages:
            browser.get(base + page)
            fits(browser, f"{width} {page}")
        # The confirmation page too, reached through its form.
        browser.get(base + "/dead")
        navigate(browser, browser.find_element(By.CSS_SELECTOR, "button.replay-one"))
        fits(browser, f"{width} confirm")
        browser.save_screenshot(str(tmp_path / f"{width}-confirm.png"))


def fits(browser: WebDriver, where: str) -> None:
    """No sideways scroll of the page, and Log out wholly inside the window."""
    inner = browser.execute_script("return window.innerWidth")
    wide = browser.execute_script("return document.documentElement.scrollWidth")
    assert wide <= inner, f"{where}: the page is {wide}px wide in a {inner}px window"
    right = browser.execute_script("return document.querySelector('.logout button').getBoundingClientRect().right")
    assert 0 < right <= inner, f"{where}: Log out ends at {right}px in a {inner}px window"


def test_a_page_asked_to_refresh_reloads_itself(pipeline: Pipeline, browser: WebDriver) -> None:
    with logged_in(pipeline, browser) as base:
        navigate(browser, browser.find_element(By.LINK_TEXT, "Jobs"))
        navigate(browser, browser.find_element(By.LINK_TEXT, "5 s"))
        assert browser.find_element(By.ID, "refresh-current").text == "5 s"
        # No script runs in the page: the browser itself loads it again within the interval.
        page = browser.find_element(By.TAG_NAME, "html")
        WebDriverWait(browser, 15).until(expected_conditions.staleness_of(page))
        assert browser.current_url == base + "/jobs?refresh=5"
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == [], severe
