"""The console in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by Selenium):
each role signs in with the keyboard, sees its pages and is refused (403) elsewhere; the language switch; an
applicant page; a download. Screenshots of the main pages go to test-artifacts/console/ (gitignored)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_web_console import PASSWORD, Console, seeded_console

CHROMIUM = Path("/usr/lib/chromium/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "console"

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip("Debian packages chromium and chromium-driver are not installed (apt-get install chromium "
                "chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402 (only when a browser exists)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    with seeded_console(tmp_path_factory.mktemp("console-browser")) as c:
        yield c


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, downloads: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1366,900", "--lang=zh-CN",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def sign_in(driver: WebDriver, console: Console, username: str) -> None:
    driver.delete_all_cookies()
    driver.get(f"{console.base_url}/console/login")
    driver.find_element(By.ID, "username").send_keys(username)
    driver.find_element(By.ID, "password").send_keys(PASSWORD, Keys.ENTER)  # the keyboard submits the form
    WebDriverWait(driver, 10).until(lambda d: "/console/login" not in d.current_url)


def status_of(driver: WebDriver, path: str) -> int:
    """The HTTP status the signed-in browser gets for ``path`` (a same-origin fetch with its cookies)."""
    return int(driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {redirect: 'manual', credentials: 'same-origin'}).then(r => done(r.status));", path))


def shot(driver: WebDriver, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(1366, min(max(height, 900), 4000))
    driver.save_screenshot(str(path))
    driver.set_window_size(1366, 900)
    assert path.stat().st_size > 10_000
    return path


def test_official_reads_applicants_switches_language_and_downloads(browser: WebDriver, console: Console,
                                                                  downloads: Path) -> None:
    sign_in(browser, console, "official1")
    assert browser.current_url.endswith("/console/applicants")
    assert browser.find_element(By.TAG_NAME, "h1").text == "申报主体一览（2025 年度）"
    table = browser.find_element(By.ID, "applicants").text
    assert "嘉兴示范工业互联网平台" in table and "措施 5" in table
    shot(browser, "applicants-zh")

    browser.find_element(By.LINK_TEXT, "plat-1").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "chart-active"))
    assert "现场抽查清单" in browser.page_source
    assert len(browser.find_elements(By.CSS_SELECTOR, "#spot-check tbody tr")) == 20
    shot(browser, "applicant-zh")

    browser.find_element(By.ID, "lang-switch").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.TAG_NAME, "html").get_attribute("lang") == "en")
    assert "On-site spot-check list" in browser.page_source and "现场抽查清单" not in browser.page_source
    shot(browser, "applicant-en")

    browser.find_element(By.ID, "dl-verdict").click()
    target = downloads / "plat-1-2025-verdict.json"
    deadline = time.monotonic() + 10
    while not target.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert json.loads(target.read_text(encoding="utf-8"))["applicant"]["id"] == "plat-1"

    browser.find_element(By.ID, "dl-pdf").click()
    def pdf_or_message(d: WebDriver) -> bool:
        return bool(d.find_elements(By.ID, "error-message")) or any(downloads.glob("plat-1-2025*.pdf"))

    WebDriverWait(browser, 20).until(pdf_or_message)
    if browser.find_elements(By.ID, "error-message"):  # reports not served by this verifier: a clear message
        assert "The verdict (JSON) can always be downloaded" in browser.find_element(By.ID, "error-message").text
    else:
        (pdf,) = downloads.glob("plat-1-2025*.pdf")
        assert pdf.read_bytes().startswith(b"%PDF")
    assert status_of(browser, "/console/admin") == 403
    browser.get(f"{console.base_url}/console/lang/zh?next=/console/applicants")


def test_admin_manages_and_cannot_read_verdicts(browser: WebDriver, console: Console) -> None:
    sign_in(browser, console, "admin1")
    assert browser.current_url.endswith("/console/admin")
    browser.find_element(By.ID, "tok-ttl").clear()
    browser.find_element(By.ID, "tok-ttl").send_keys("3")
    browser.find_element(By.ID, "issue-token").click()
    token = WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "issued-token")).text
    assert len(token) > 30
    shot(browser, "admin-zh")
    assert status_of(browser, "/console/applicants") == 403
    assert status_of(browser, "/console/applicants/plat-1") == 403
    assert status_of(browser, "/console/applicants/plat-1/agents") == 200
    browser.get(f"{console.base_url}/console/applicants/plat-1")
    assert browser.find_element(By.TAG_NAME, "h1").text == "无权访问"


def test_operator_sees_only_its_agents_and_the_stale_one_stands_out(browser: WebDriver, console: Console) -> None:
    sign_in(browser, console, "operator1")
    assert browser.current_url.endswith("/console/applicants/plat-1/agents")
    stale = browser.find_elements(By.CSS_SELECTOR, "tr.stale")
    assert [row.get_attribute("data-agent") for row in stale] == [console.agents["quiet"]]
    background = stale[0].value_of_css_property("background-color")
    normal = browser.find_element(By.CSS_SELECTOR, f'tr[data-agent="{console.agents["main"]}"]')
    assert background != normal.value_of_css_property("background-color")
    shot(browser, "agents-zh")
    for path in ("/console/applicants/node-1/agents", "/console/applicants", "/console/admin",
                 "/console/applicants/plat-1/verdict/2025.json"):
        assert status_of(browser, path) == 403, path


def test_keyboard_first_tab_reaches_the_skip_link_and_focus_is_visible(browser: WebDriver, console: Console) -> None:
    sign_in(browser, console, "official1")
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    focused = browser.switch_to.active_element
    assert focused.get_attribute("class") == "skip-link"
    assert focused.value_of_css_property("outline-style") == "solid"
    focused.send_keys(Keys.ENTER)
    assert browser.current_url.endswith("#main")
    labels = browser.execute_script(
        "return Array.from(document.querySelectorAll('input:not([type=hidden]), select'))"
        ".filter(e => !document.querySelector('label[for=\"' + e.id + '\"]')).length")
    assert labels == 0


def test_screenshots_render_chinese_glyphs() -> None:
    """Chinese needs a CJK font (Debian fonts-noto-cjk); without one, Chromium draws empty boxes."""
    assert shutil.which("fc-list"), "fontconfig missing"
    import subprocess

    fonts = subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True, timeout=20).stdout
    assert fonts.strip(), "no CJK font installed: apt-get install fonts-noto-cjk"
