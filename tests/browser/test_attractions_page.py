"""The Attractions page in a real browser: Debian's chromium driven by Playwright (no browser download),
against uvicorn serving create_app over a populated PostgreSQL database."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_api import EIFFEL, KEY, T0, VERSION, populate  # noqa: E402

from shared.api.app import create_app  # noqa: E402
from shared.api.auth import make_token  # noqa: E402
from shared.db import writer  # noqa: E402
from shared.db.session import transaction  # noqa: E402
from shared.events import PhotoUploaded  # noqa: E402
from shared.outcomes import Method, PhotoOutcome, PhotoStatus, Tag  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CHROMIUM = Path("/usr/bin/chromium")
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "attractions.png"
EXTRA_EIFFEL = 65  # more than one page (60) of the page's album grid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def library(engine, tmp_path_factory):
    lib = populate(engine, tmp_path_factory.mktemp("browser-photos"))
    # alice's Eiffel album gets a second page: more uploads of pictures she already has.
    outcomes = []
    for i in range(EXTRA_EIFFEL):
        source = lib.root / lib.alice / f"eiffel-{i % 7}.jpg"
        event = PhotoUploaded(event_id=f"{lib.alice}-more-{i}", user_id=lib.alice, photo_id=f"paris-{i:03d}",
                              uri=source.as_uri(), uploaded_at=T0 - timedelta(days=30, hours=i))
        outcomes.append(PhotoOutcome(event, PhotoStatus.TAGGED, [Tag(EIFFEL, 0.6, Method.REFERENCE)]))
    with transaction(engine) as session:
        writer.write_outcomes(session, VERSION, outcomes)
    return lib


@pytest.fixture(scope="module")
def server(engine, library):
    import uvicorn

    app = create_app(library.settings, engine, token_key=KEY)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with playwright_api.sync_playwright() as p:
        # --no-sandbox: CI containers run as root, where chromium's sandbox cannot start.
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def _db(engine, sql: str, **params) -> list:
    with engine.connect() as conn:
        return conn.execute(text(sql), params).all()


def _wait_images_loaded(page, selector: str, count: int) -> None:
    page.wait_for_function(
        "([sel, n]) => document.querySelectorAll(sel + ' img.loaded').length >= n && "
        "[...document.querySelectorAll(sel + ' img.loaded')].every(i => i.complete && i.naturalWidth > 0)",
        arg=[selector, count], timeout=30_000)


def test_attractions_page(browser, server, engine, library, tmp_path):
    user = library.alice
    context = browser.new_context(viewport={"width": 1280, "height": 860}, device_scale_factor=1,
                                  reduced_motion="reduce")
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{server}/#token={make_token(KEY, user)}")

    # ---- cities and landmark cards match the views
    page.wait_for_selector("section.city")
    assert "token" not in page.evaluate("location.href")  # moved to sessionStorage
    cities = page.eval_on_selector_all(
        "section.city", "els => els.map(e => [e.dataset.country, e.dataset.city, e.querySelector('h2').textContent])")
    db_cities = _db(engine, "SELECT country, city FROM album_cities WHERE user_id = :u ORDER BY country, city", u=user)
    assert [(c[0], c[1]) for c in cities] == [tuple(r) for r in db_cities] == [("France", "Paris"), ("Italy", "Rome")]
    assert [c[2] for c in cities] == ["Paris", "Rome"]
    cards = page.eval_on_selector_all(
        ".card", "els => els.map(e => [e.closest('section.city').dataset.city, Number(e.dataset.landmarkId),"
                 " e.querySelector('.name').textContent, e.querySelector('.count').textContent])")
    db_cards = _db(engine, "SELECT city, landmark_id, name, photo_count FROM album_landmarks WHERE user_id = :u"
                           " ORDER BY country, city, photo_count DESC, name", u=user)
    assert [(c[0], c[1], c[2], int(c[3])) for c in cards] == [tuple(r) for r in db_cards]
    assert ("Paris", EIFFEL, "Eiffel Tower", 7 + EXTRA_EIFFEL) in {(c[0], c[1], c[2], int(c[3])) for c in cards}
    _wait_images_loaded(page, ".card", len(cards))
    page.screenshot(path=str(tmp_path / "attractions.png"), full_page=True)

    # ---- one landmark's album: first page, then "load more" by cursor
    page.click(f".card[data-landmark-id='{EIFFEL}']")
    page.wait_for_selector("#album:not([hidden]) .tile")
    assert page.text_content("#title") == "Eiffel Tower"
    assert page.eval_on_selector_all(".tile", "els => els.length") == 60
    assert page.is_visible("#more")
    _wait_images_loaded(page, "#grid", 12)  # those in view
    page.screenshot(path=str(tmp_path / "album.png"))
    page.click("#more")
    page.wait_for_function(f"document.querySelectorAll('.tile').length === {7 + EXTRA_EIFFEL}")
    page.wait_for_selector("#more", state="hidden")
    shown = page.eval_on_selector_all(".tile", "els => els.map(e => e.dataset.photoId)")
    expected = [r[0] for r in _db(engine, "SELECT photo_id FROM album_photos WHERE user_id = :u AND landmark_id = :l"
                                          " ORDER BY uploaded_at DESC, photo_id DESC", u=user, l=EIFFEL)]
    assert shown == expected and len(set(shown)) == len(shown)

    # ---- a photo, large, then its heatmap
    page.click(".tile >> nth=0")
    page.wait_for_selector("#viewer:not([hidden])")
    page.wait_for_function("() => { const i = document.getElementById('viewer-img');"
                           " return i.dataset.kind === 'image' && i.complete && i.naturalWidth > 0; }")
    assert page.get_attribute("#viewer", "data-photo-id") == shown[0]
    assert page.evaluate("document.getElementById('viewer-img').naturalWidth") == 640
    page.screenshot(path=str(tmp_path / "photo.png"))
    page.check("#heatmap-toggle")
    page.wait_for_function("() => { const i = document.getElementById('viewer-img');"
                           " return i.dataset.kind === 'heatmap' && i.complete && i.naturalWidth > 0; }",
                           timeout=60_000)
    page.wait_for_function("document.getElementById('viewer-status').textContent === ''")
    page.screenshot(path=str(tmp_path / "heatmap.png"))
    page.uncheck("#heatmap-toggle")
    page.wait_for_function("document.getElementById('viewer-img').dataset.kind === 'image'")
    page.keyboard.press("Escape")
    page.wait_for_selector("#viewer", state="hidden")

    # ---- back to the Attractions album (browser history)
    page.click("#back")
    page.wait_for_selector("#attractions:not([hidden]) .card")
    assert page.text_content("#title") == "Attractions"

    # ---- a phone-sized screen
    phone = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                reduced_motion="reduce")
    mobile = phone.new_page()
    mobile.goto(f"{server}/#token={make_token(KEY, user)}")
    mobile.wait_for_selector(".card")
    _wait_images_loaded(mobile, ".card", 2)
    columns = mobile.evaluate("getComputedStyle(document.querySelector('.grid')).gridTemplateColumns.split(' ').length")
    assert columns == 2
    mobile.screenshot(path=str(tmp_path / "attractions-phone.png"))
    phone.close()

    assert errors == []
    context.close()
    if os.environ.get("LANDMARKS_UPDATE_SCREENSHOT") == "1":  # refresh the README's picture on purpose only
        shutil.copyfile(tmp_path / "attractions.png", DOCS_SCREENSHOT)
    print(f"screenshots in {tmp_path}")


def test_page_without_a_token_says_how_to_sign_in(browser, server):
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{server}/")
    page.wait_for_selector("#status.error")
    assert "#token=" in page.text_content("#status")
    context.close()


def test_another_users_token_shows_only_their_albums(browser, server, library):
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{server}/#token={make_token(KEY, library.bob)}")
    page.wait_for_selector(".card")
    assert page.eval_on_selector_all(".card .name", "els => els.map(e => e.textContent)") == ["Big Ben"]
    # The page cannot be talked into another user's album: the API refuses the path.
    status = page.evaluate(
        "async (u) => (await fetch(`/v1/users/${u}/attractions`,"
        " {headers: {Authorization: `Bearer ${sessionStorage.getItem('landmarks.token')}`}})).status",
        library.alice)
    assert status == 403
    context.close()
