"""The station's page in a real browser: Debian's chromium, headless, driven by
selenium through Debian's chromedriver (nothing is downloaded). It loads the
page, uploads cells and a module photo, sees the decisions the API gave,
enlarges a module cell and answers one review with the keyboard; the answer
is then a row of labels.csv."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from servehelp import RunningServer

from elcell.cells.images import load_cell
from elcell.cells.labels import read_labels_csv
from elcell.infer.runtime import open_model, score_cells
from elcell.station.app import Settings, create_app

MODULE = Path(__file__).parent / "data" / "modules" / "poly-6x10-A1.jpg"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"),
]


@pytest.fixture()
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def test_the_page_scores_inspects_and_reviews(browser, tiny_onnx, seed_csv, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    model = open_model(tiny_onnx, spin=False)
    cells = read_labels_csv(seed_csv).paths[24:30]
    scores = score_cells(model, [load_cell(p, model.decoding) for p in cells])
    middle = float(np.median(scores.probs[:, 0]))  # flags about half of them (the tiny model is unsure)
    settings = Settings(labels_out=tmp_path / "reviewed", thresholds=[middle, 1.0], review_thresholds=[middle, 1.0])
    expected = score_cells(model, [load_cell(p, model.decoding) for p in cells], thresholds=[middle, 1.0],
                           review_thresholds=[middle, 1.0]).decisions
    with RunningServer(create_app(model, settings)) as server:
        browser.get(server.url + "/")
        wait(browser, lambda d: model.path.name in d.find_element(By.ID, "model-info").text)
        # cells: one card per file, with the decisions the model made
        browser.find_element(By.ID, "files").send_keys("\n".join(map(str, cells)))
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card")) == len(cells))
        for path, decisions in zip(cells, expected, strict=True):
            card = browser.find_element(By.CSS_SELECTOR, f'.card[data-name="{path.name}"]')
            shown = [card.find_element(By.CSS_SELECTOR, f'.decision[data-label="{label}"]').text.lower()
                     for label in model.info.labels]
            assert shown == list(decisions)
        wait(browser, lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results .card img')].every(i => i.naturalWidth > 0)"))
        # a module: its grade, its map, a cell enlarged by a click
        browser.find_element(By.ID, "mode-module").click()
        grid = browser.find_element(By.ID, "grid")
        grid.clear()
        grid.send_keys("6x10")
        browser.find_element(By.ID, "files").send_keys(str(MODULE))
        wait(browser, lambda d: d.find_element(By.ID, "module-grade").text.strip() != "")
        wait(browser, lambda d: d.execute_script("return document.getElementById('module-map').naturalWidth > 0"))
        map_cells = browser.find_elements(By.CSS_SELECTOR, ".map-cell")
        assert len(map_cells) == 60
        browser.execute_script("arguments[0].click()", map_cells[13])
        wait(browser, lambda d: d.find_element(By.ID, "modal").is_displayed())
        assert "r2 c4" in browser.find_element(By.ID, "modal-title").text
        wait(browser, lambda d: d.execute_script(
            "return [...document.querySelectorAll('#modal img')].every(i => i.naturalWidth > 0)"))
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        wait(browser, lambda d: not d.find_element(By.ID, "modal").is_displayed())
        # the review loop: key 1 answers "crack only" for the cell shown
        wait(browser, lambda d: d.find_element(By.ID, "review-item").is_displayed())
        name = browser.find_element(By.ID, "review-name").text
        browser.find_element(By.TAG_NAME, "body").send_keys("1")
        wait(browser, lambda d: "labels.csv" in d.find_element(By.ID, "review-saved").text)
    table = read_labels_csv(tmp_path / "reviewed" / "labels.csv")
    assert len(table) == 1 and table.targets.tolist() == [[1.0, 0.0]]
    assert Path(name).stem in table.paths[0].name and table.paths[0].is_file()


def test_the_page_shows_markup_in_names_and_errors_as_text(browser, tiny_onnx, seed_csv, tmp_path):
    """Issue 34: a file named like markup, and an error message that repeats that
    name, come back from the API verbatim; the page shows them as text, and the
    markup neither becomes elements nor runs."""
    from selenium.webdriver.common.by import By

    model = open_model(tiny_onnx, spin=False)
    broken = tmp_path / "<img src=x onerror=window.pwned=1>.png"
    broken.write_bytes(b"not an image at all")
    cell = tmp_path / "<b id=bold>cell.png"  # no "/": it is a file name
    cell.write_bytes(read_labels_csv(seed_csv).paths[24].read_bytes())
    with RunningServer(create_app(model, Settings())) as server:
        browser.get(server.url + "/")
        wait(browser, lambda d: model.path.name in d.find_element(By.ID, "model-info").text)
        browser.find_element(By.ID, "files").send_keys(f"{broken}\n{cell}")
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card")) == 2)
        names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .card .name")]
        assert sorted(names) == sorted([broken.name, cell.name])
        error = browser.find_element(By.CSS_SELECTOR, "#results .card.failed .error-text").text
        assert error.startswith(f"{broken.name}: not a readable image")  # the server's message, markup and all
        assert browser.execute_script(
            "return [document.querySelectorAll('#results img[src=\"x\"], #bold, #results b').length,"
            " typeof window.pwned]") == [0, "undefined"]


def test_the_review_loop_survives_a_reload_a_restart_and_a_repeated_upload(browser, tiny_onnx, seed_csv, tmp_path):
    """As an operator's shift goes: cells in, a review started, the page reloaded
    (its cell comes back at once), the same cells scored again (no second queue
    entry), keys after typing the grid and after a click on the drop zone, the
    station restarted on the same folder (the page carries on, counts right),
    and an answer to a cell the station lost (said in words, not saved)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    model = open_model(tiny_onnx, spin=False)
    cells = read_labels_csv(seed_csv).paths[24:32]
    probs = score_cells(model, [load_cell(p, model.decoding) for p in cells]).probs
    middle = float(np.median(probs[:, 0]))
    folder = tmp_path / "reviewed"

    def station():
        return create_app(model, Settings(labels_out=folder, thresholds=[middle, 1.0],
                                          review_thresholds=[middle, 1.0], review_random=0.0))

    def text(element_id: str) -> str:
        return browser.find_element(By.ID, element_id).text

    def key(keys: str) -> None:  # typed wherever the focus is, as a person types
        ActionChains(browser).send_keys(keys).perform()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    first = station()
    with RunningServer(first, port=port) as server:
        browser.get(server.url + "/")
        wait(browser, lambda d: model.path.name in text("model-info"))
        browser.find_element(By.ID, "files").send_keys("\n".join(map(str, cells)))
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card")) == len(cells))
        ranks = [{"defect": 0, "review": 1, "queued": 2, "ok": 3}[card.get_attribute("data-flag")]
                 for card in browser.find_elements(By.CSS_SELECTOR, "#results .card")]
        assert ranks == sorted(ranks) and ranks[0] == 0  # flagged cells first
        wait(browser, lambda d: d.find_element(By.ID, "review-item").is_displayed())
        held = text("review-name")
        assert text("review-reason").startswith("why: uncertain: crack")
        waiting = first.state.station.queue.counts()["waiting"]
        wait(browser, lambda d: text("review-count").startswith(f"{waiting} waiting"))
        # a reload: the same cell, at once (not after its lease)
        browser.refresh()
        wait(browser, lambda d: d.find_element(By.ID, "review-item").is_displayed(), timeout=10)
        assert text("review-name") == held
        # the same cells scored again mid-review: no second queue entry
        browser.find_element(By.ID, "files").send_keys("\n".join(map(str, cells)))
        wait(browser, lambda d: text("status").startswith("scored"))  # the reload emptied the cards
        assert len(browser.find_elements(By.CSS_SELECTOR, "#results .card")) == len(cells)
        assert first.state.station.queue.counts()["waiting"] == waiting
        assert text("review-count").startswith(f"{waiting} waiting") and text("review-name") == held
        # keys after typing the grid (Enter leaves it) and after a click on the drop zone
        grid = browser.find_element(By.ID, "grid")
        grid.click()
        grid.send_keys(Keys.CONTROL, "a")
        grid.send_keys("6x10", Keys.ENTER)
        key("1")
        wait(browser, lambda d: "row 1 of labels.csv" in text("review-saved"))
        assert grid.get_attribute("value") == "6x10" and held in text("review-saved")
        wait(browser, lambda d: text("review-name") not in ("", held))
        browser.execute_script("document.getElementById('files').focus()")  # what a click on it does
        assert browser.execute_script("return document.activeElement.id") == "files"
        before = text("review-name")
        key("s")  # skip
        wait(browser, lambda d: text("review-name") != before)
        stale = browser.execute_script("return state.review.id")
    # the station restarts on the same folder; the open page carries on
    second = station()
    with RunningServer(second, port=port):
        wait(browser, lambda d: text("review-count") == f"{waiting - 1} waiting · 1 answered")
        key(Keys.NUMPAD0)  # the stale page's cell is still known: saved as ok
        wait(browser, lambda d: "row 2 of labels.csv" in text("review-saved"))
        wait(browser, lambda d: browser.execute_script("return state.review && state.review.id") not in (None, stale))
        lost = browser.execute_script("return state.review.id")
        second.state.station.queue.done(lost)  # as if dropped from a full queue
        key("2")
        wait(browser, lambda d: "not saved" in text("review-saved"))
        assert "no longer waits for review" in text("review-saved")
    table = read_labels_csv(folder / "labels.csv")
    assert len(table) == 2 and table.targets.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert all(p.is_file() for p in table.paths)
