"""The owner's web page in real headless Chromium: log in, open a request, approve it, see the
job run and the result appear, release it; and scientist-supplied text stays text."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sites import RunningSite, start_site

pytestmark = pytest.mark.integration

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("Debian's chromium and chromium-driver are not installed", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1300,1000",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSite]:
    # plain HTTP on loopback: the browser would not trust the test CA's certificate
    running = start_site(tmp_path_factory.mktemp("page") / "site", tls=False)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=DRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def test_owner_logs_in_approves_and_sees_the_result(site: RunningSite, browser: Any) -> None:
    sam = site.as_("sam")
    request = sam.submit(
        "def mean_age(assets):\n"
        "    # a comment the page highlights\n"
        "    return {'mean_age': float(assets['patients']['age'].mean()), 'note': 'ok'}\n",
        entrypoint="mean_age",
        assets=["patients"],
        name="<img src=x onerror=alert(1)>",
    )
    request.wait(("mock-run",), timeout=60)
    wait = WebDriverWait(browser, 30)
    browser.get(site.url + "/")
    browser.find_element(By.ID, "token").send_keys(site.tokens["olivia"])
    browser.find_element(By.ID, "login-btn").click()
    row = wait.until(
        ec.element_to_be_clickable(
            (By.CSS_SELECTOR, f"#pending-table tr[data-request='{request.id}']")
        )
    )
    # the scientist's name for the request is shown as text, not run as HTML
    assert "<img src=x onerror=alert(1)>" in row.text
    assert not browser.find_elements(By.CSS_SELECTOR, "#pending-table img")
    row.click()
    code = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "pre.code")))
    assert "def mean_age" in code.text
    assert code.find_elements(By.CSS_SELECTOR, "span.kw") and code.find_elements(
        By.CSS_SELECTOR, "span.com"
    )
    wait.until(ec.text_to_be_present_in_element((By.ID, "mock-result"), "mean_age"))
    assert request.code_hash in browser.find_element(By.CSS_SELECTOR, "#view-request").text
    browser.find_element(By.ID, "decision-reason").send_keys("one mean, fine")
    browser.find_element(By.ID, "approve-btn").click()
    # the page follows the job: approved, queued, running, then the real result and release
    release = wait.until(ec.element_to_be_clickable((By.ID, "release-btn")))
    real = browser.find_element(By.ID, "real-result").text
    assert "mean_age" in real and "ok" in real
    release.click()
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#view-request h2"), "released"))
    assert request.result()["note"] == "ok"
    browser.save_screenshot(str(site.directory / "page.png"))
    # the ledger and the audit trail are one click away
    browser.find_element(By.CSS_SELECTOR, "#nav button[data-view='audit']").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "audit-verify"), "chain intact"))
    assert "request.approve" in browser.find_element(By.ID, "audit-table").text
    browser.find_element(By.CSS_SELECTOR, "#nav button[data-view='ledger']").click()
    wait.until(ec.visibility_of_element_located((By.ID, "ledger-table")))


def test_a_scientist_token_does_not_open_the_page(site: RunningSite, browser: Any) -> None:
    browser.execute_script("sessionStorage.clear()")
    browser.get(site.url + "/")
    browser.find_element(By.ID, "token").send_keys(site.tokens["sam"])
    browser.find_element(By.ID, "login-btn").click()
    WebDriverWait(browser, 20).until(
        ec.text_to_be_present_in_element((By.ID, "error"), "for the datasite's owner")
    )
    assert not browser.find_element(By.ID, "nav").is_displayed()
