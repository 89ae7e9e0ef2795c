"""An annotator's view in headless Chromium (Debian's chromium + chromedriver, driven by Selenium)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.runner import run_stage
from pipeline.selection import stage_ledger
from pipeline.stage import RunOptions
from stages.review.pull import pull, read_reviews
from stages.review.push import ReviewStage
from standins.review_run import REPO, make_clips
from standins.review_run import TEST_CREDS as CREDS

pytestmark = pytest.mark.slow
ARTIFACTS = REPO / "test-artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1100",
]


@pytest.fixture
def browser(tmp_path: Path) -> Any:
    from selenium import webdriver

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail(
            "Debian's chromium and chromium-driver are needed (apt-get install chromium chromium-driver)"
        )
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'chrome-profile'}"]:
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=webdriver.ChromeService(driver), options=opts)
    drv.implicitly_wait(30)
    yield drv
    drv.quit()


def js_click(drv: Any, element: Any) -> None:
    drv.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].click()", element)


def test_annotator_edits_the_prefilled_merge_in_the_browser(
    run_ctx: Any, ls_server: Any, browser: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    clips = make_clips(1, "w")
    ctx = run_ctx("run", clips)
    run_stage(ReviewStage, ctx, RunOptions(progress=False))
    row = stage_ledger(ReviewStage(ctx)).latest().iloc[0]
    task_id, project_id = int(row["ls_task_id"]), int(row["ls_project_id"])

    browser.get(f"{ls_server.url}/user/login/")
    browser.find_element(By.NAME, "email").send_keys(CREDS.username)
    browser.find_element(By.NAME, "password").send_keys(CREDS.password)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
    WebDriverWait(browser, 30).until(lambda d: "/user/login" not in d.current_url)
    browser.get(f"{ls_server.url}/projects/{project_id}/data?task={task_id}")
    wait = WebDriverWait(browser, 60)

    # The keyframe is served from the run's media folder and has really loaded.
    img = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "img[src*='local-files']")))
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img))
    assert browser.execute_script("return arguments[0].naturalWidth", img) == 320
    assert browser.find_elements(By.CSS_SELECTOR, "[aria-label=Play]"), "no audio player"
    # The player shows the clip's length only once it has fetched and decoded the audio file.
    end = browser.find_element(By.CSS_SELECTOR, "[data-testid=timebox-end-time] input")
    wait.until(lambda d: end.get_attribute("value") == "00:00:10:000")
    page = browser.find_element(By.TAG_NAME, "body").text
    for text in [*clips[0]["audio_captions"], clips[0]["visual_caption"]]:
        assert text in page
    regions = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".lsf-textarea__region"))
    assert [r.text for r in regions] == clips[0]["merged_captions"]  # the merge, prefilled

    # Correct both lines the two ways an annotator can: the first in place (pencil, type, Enter,
    # then leave the box: the edit is saved on blur), the second by deleting it and typing anew.
    edit1, edit2 = "A brown dog barks loudly at two birds", "Two birds chirp above the barking dog"
    js_click(browser, regions[0].find_element(By.CSS_SELECTOR, "button[aria-label='Edit Region']"))
    line = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".lsf-textarea__region textarea"))
    line.send_keys(Keys.CONTROL + "a")  # one call per chord: a modifier stays down until the call ends
    line.send_keys(Keys.BACKSPACE)
    line.send_keys(edit1)
    line.send_keys(Keys.ENTER)
    browser.find_element(By.XPATH, "//*[normalize-space(text())='Verdict']").click()  # leave the box
    regions = browser.find_elements(By.CSS_SELECTOR, ".lsf-textarea__region")
    js_click(browser, regions[1].find_element(By.CSS_SELECTOR, "button[aria-label='Delete Region']"))
    box = browser.find_element(By.CSS_SELECTOR, "textarea[placeholder='Merged audio-visual caption']")
    box.send_keys(edit2)
    box.send_keys(Keys.SHIFT, Keys.ENTER)
    wait.until(
        lambda d: (
            [r.text for r in d.find_elements(By.CSS_SELECTOR, ".lsf-textarea__region")] == [edit1, edit2]
        )
    )
    js_click(
        browser, browser.find_element(By.XPATH, "//label[.//span[starts-with(normalize-space(.), 'edited')]]")
    )
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "review-task.png"))
    js_click(browser, browser.find_element(By.CSS_SELECTOR, "button[aria-label='Submit current annotation']"))

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not pull(ctx).reviewed:
        time.sleep(0.5)
    got = read_reviews(ctx.workdir).iloc[0]
    assert got["verdict"] == "edited" and got["annotator"] == CREDS.username
    assert list(got["final_captions"]) == [edit1, edit2]

    # The Instructions button shows the link to the annotator guide; a plain click opens it (in
    # the same tab: Label Studio's sanitizer drops target="_blank").
    js_click(browser, browser.find_element(By.XPATH, "//button[normalize-space(.)='Instructions']"))
    link = wait.until(lambda d: d.find_element(By.LINK_TEXT, "Read the annotator guide"))
    assert link.is_displayed()
    link.click()
    wait.until(lambda d: "annotator-guide.html" in d.current_url)
    heading = wait.until(lambda d: d.find_element(By.TAG_NAME, "h1"))
    assert heading.text == "AudioVisualCaps review: annotator guide"
    body = browser.find_element(By.TAG_NAME, "body").text
    assert all(f"Example {i}: {v}" in body for i, v in enumerate(("accept", "edited", "rejected"), 1))
