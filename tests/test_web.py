"""The web page at ``/`` of ``microlora serve``: what the server sends (plain HTTP), and the
page driven in a real browser (tests marked ``browser``: headless Chromium from the Debian
package, through Playwright; they skip, saying why, where either is missing, and fail instead
under CI, which installs both).

The server runs the tiny random base model with the real packaged embedder (all-MiniLM-L6-v2,
in its wheel: nothing is downloaded): the page-2 question must retrieve a page-2 sentence, so
the embeddings must mean something; the answers' wording is the tiny model's gibberish and is
never asserted, only the sources and their pages."""

from __future__ import annotations

import base64
import fnmatch
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from conftest import store_of_random_atoms

from compiler.documents import SUPPORTED
from composer import Composer
from microlora.core.config import (
    MODES,
    AskConfig,
    ChunkConfig,
    TargetSpec,
    TrainConfig,
)
from microlora.core.embedder import load_embedder
from microlora.core.models import load_base_model
from microlora.server.app import Service, serve_in_thread
from microlora.server.config import ServeConfig
from microlora.server.keys import KeyStore
from store import AdapterStore

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
WEB = ROOT / "microlora" / "server" / "web"
SHARED = {
    "handbook": ["The town hall of Ostrel opens at nine every weekday.",
                 "Visitors to the clock tower must book a guided tour."],
    "memos": ["The spring fair moves to the harbour this year."],
}
RECIPE = TrainConfig(targets=TargetSpec(last_layers=2), max_steps=2, lr=2e-2, bf16=False,
                     batch_atoms=16, neighbours=0, qa_views=0)
PAGE_2_QUESTION = "How much does the clock built for the cathedral of Velmora weigh?"


@pytest.fixture(scope="module")
def web(tiny_models, tmp_path_factory):
    """A server over a fresh store: (base url, service, keys by user). ana reads every shared
    corpus, bob only the handbook."""
    base, emb = load_base_model(tiny_models[0], dtype="fp32"), load_embedder()
    path = store_of_random_atoms(tmp_path_factory.mktemp("web") / "kb", base, emb, SHARED)
    keys = KeyStore(path)
    tokens = {"ana": keys.add("ana")[0], "bob": keys.add("bob", ("handbook",))[0]}
    service = Service(Composer(AdapterStore(path), base, emb),
                      ServeConfig(ask=AskConfig(max_new_tokens=4), train=RECIPE,
                                  chunk=ChunkConfig(min_chars=10)))
    with serve_in_thread(service) as url:
        yield url, service, tokens
    service.close()


def api(web, user: str) -> httpx.Client:
    url, _, tokens = web
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens[user]}"},
                        timeout=60)


# -- what the server sends --------------------------------------------------------------------

def test_the_page_and_its_assets_come_from_the_server_alone(web):
    url, service, _ = web
    with httpx.Client(base_url=url) as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        html = page.text
        links = re.findall(r'(?:src|href)="([^"]*)"', html)
        assert sorted(links) == ["/web/app.js", "/web/style.css"]
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "<script>" not in html and " style=" not in html  # nothing inline: CSP
        for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
            r = c.get(f"/web/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
            assert "http://" not in r.text and "https://" not in r.text
        assert c.get("/web/index.html").status_code == 404
        assert c.get("/web/../keys.json").status_code == 404
        assert "/" not in c.get("/openapi.json").json()["paths"]
    assert re.findall(r'<option value="(\w+)"', html) == list(MODES)
    default = service.config.ask.mode.value
    assert re.findall(r'<option value="(\w+)" selected', html) == [default]
    assert f'accept="{",".join(SUPPORTED)}"' in html and "{{" not in html


def test_the_web_assets_are_package_data():
    """Every file of microlora/server/web/ matches pyproject's package-data, so a wheel
    carries it (setuptools ships only what a pattern names)."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib: Python 3.11+")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["microlora"]
    files = [p.relative_to(ROOT / "microlora").as_posix() for p in WEB.iterdir()]
    assert sorted(files) == ["server/web/app.js", "server/web/index.html",
                             "server/web/style.css"]
    assert all(any(fnmatch.fnmatch(f, p) for p in patterns) for f in files)


def test_namespaces_lists_the_callers_own_and_granted_corpora_only(web):
    with api(web, "ana") as ana, api(web, "bob") as bob:
        r = ana.post("/v1/documents", json={"documents": [{"id": "diary", "text":
                     "Ana keeps her bicycle in the blue shed behind the bakery."}]})
        web[1].jobs.wait(r.json()["job"]["id"], timeout=120)
        mine = ana.get("/v1/namespaces").json()
        theirs = bob.get("/v1/namespaces").json()
        assert httpx.get(f"{web[0]}/v1/namespaces").status_code == 401
        ana.delete("/v1/documents/diary")
    assert mine["user"] == "ana" and theirs["user"] == "bob"
    assert [(n["id"], n["kind"]) for n in mine["data"]] == [
        ("user:ana", "own"), ("handbook", "shared"), ("memos", "shared")]
    assert mine["data"][0]["atoms"] == 1 and mine["data"][1]["atoms"] == 2
    assert [(n["id"], n["atoms"]) for n in theirs["data"]] == [("user:bob", 0), ("handbook", 2)]


def test_answers_carry_their_atoms_sources(web):
    """Additive to OpenAI's shape: each atom of a choice says where it came from."""
    with api(web, "bob") as bob:
        r = bob.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "When does the town hall open?"}]})
    assert r.status_code == 200, r.text
    (atom,) = r.json()["choices"][0]["atoms"]
    assert atom["namespace"] == "handbook" and atom["source"] == "handbook.txt"
    assert atom["text"] == SHARED["handbook"][0] and atom["citation"] == "handbook.txt"
    assert atom["page"] is None and atom["section"] == [] and atom["score"] > 0.3


# -- in a browser -----------------------------------------------------------------------------

def _chromium() -> str | None:
    return os.environ.get("MICROLORA_CHROMIUM") or shutil.which("chromium") or \
        shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from the machine (never a browser download); a skip with the reason
    where it or Playwright is missing, a failure under CI (which installs both)."""
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "playwright is not installed: pip install -e '.[test]'"
    executable = _chromium()
    if missing is None and executable is None:
        missing = "no chromium on PATH: apt-get install -y chromium (or set MICROLORA_CHROMIUM)"
    if missing:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run the browser tests: {missing}")
        pytest.skip(missing)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable,
                                     args=["--headless", "--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, web):
    """A fresh tab (its own session storage) on the page, with no key yet."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    tab.goto(web[0] + "/")
    yield tab
    context.close()


def shot(page, name: str) -> None:
    """With MICROLORA_SCREENSHOTS=DIR, save the page as DIR/NAME.png (the README's pictures:
    ``MICROLORA_SCREENSHOTS=docs/web pytest -m browser tests/test_web.py``)."""
    folder = os.environ.get("MICROLORA_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        bottom = page.evaluate("Math.max(...[...document.querySelectorAll('section')]"
                               ".map(s => s.getBoundingClientRect().bottom))")
        png = Path(folder) / f"{name}.png"
        page.screenshot(path=str(png), clip={"x": 0, "y": 0, "width": 1280,
                                             "height": min(bottom + 24, 860)})
        from PIL import Image  # 64 colours: a third of the bytes, the text as sharp

        Image.open(png).convert("RGB").quantize(64).save(png, optimize=True)


def sign_in(page, key: str, user: str) -> None:
    page.fill("#key", key)
    page.click("#login-form button")
    page.wait_for_selector(f"#user:text-is('{user}')")


def drop_files(page, *names: str) -> None:
    """Drop files on the drop zone, as a person dragging them from their desktop does."""
    files = [[name, base64.b64encode((DATA / name).read_bytes()).decode()] for name in names]
    transfer = page.evaluate_handle("""files => {
        const transfer = new DataTransfer();
        for (const [name, data] of files) {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            transfer.items.add(new File([bytes], name));
        }
        return transfer;
    }""", files)
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def ask(page, question: str):
    """Ask and wait for the answer to end; its card (the newest is first)."""
    before = page.locator(".answer").count()
    page.fill("#question", question)
    page.click("#ask-button")
    page.wait_for_function(f"document.querySelectorAll('.answer').length > {before}")
    page.wait_for_selector(".answer:first-child:is(.complete, .failed)")
    return page.locator(".answer").first


@pytest.mark.browser
def test_upload_ask_with_page_sources_forget_and_ask_again(page, web):
    shot(page, "key")
    assert page.locator("#key").is_visible() and not page.locator("#app").is_visible()
    sign_in(page, web[2]["ana"], "ana")
    drop_files(page, "report.pdf", "scanned.pdf")
    report = page.locator(".upload.done", has_text="report.pdf")
    report.wait_for(timeout=90_000)
    assert re.search(r"done: \d+ atoms trained", report.inner_text())
    scanned = page.locator(".upload.failed", has_text="scanned.pdf")
    assert "no text layer" in scanned.locator(".error").inner_text()  # its own error
    row = page.locator("tbody.document[data-id='report.pdf']")
    assert int(row.locator("td.num").inner_text()) > 5

    card = ask(page, PAGE_2_QUESTION)
    assert "complete" in card.get_attribute("class")
    best = card.locator(".source").first
    assert best.get_attribute("data-source") == "report.pdf"
    assert best.get_attribute("data-page") == "2"
    assert best.locator(".citation").inner_text() == "report.pdf p. 2, Results"
    assert "Velmora" in best.locator("blockquote").inner_text()
    assert re.fullmatch(r"score 0\.\d{3}", best.locator(".score").inner_text())
    shot(page, "answer")

    row.locator("button.forget").click()
    assert "Forget" in row.inner_text() and row.locator("button.cancel").is_visible()
    shot(page, "forget")
    row.locator("button.confirm").click()
    page.locator("#no-documents").wait_for()
    assert page.locator("tbody.document").count() == 0

    again = ask(page, PAGE_2_QUESTION)
    assert "complete" in again.get_attribute("class")
    assert again.locator(".source[data-source='report.pdf']").count() == 0
    assert again.locator(".source[data-namespace='user:ana']").count() == 0


@pytest.mark.browser
def test_a_second_key_never_sees_the_first_keys_documents(page, web):
    with api(web, "ana") as ana:
        r = ana.post("/v1/documents", json={"documents": [{"id": "ana-secret.txt", "text":
                     "Ana hid the spare key of the clock tower under the third step."}]})
        web[1].jobs.wait(r.json()["job"]["id"], timeout=120)
    try:
        sign_in(page, web[2]["ana"], "ana")
        page.locator("tbody.document[data-id='ana-secret.txt']").wait_for()
        mine = ask(page, "Where is the spare key of the clock tower?")
        assert mine.locator(".source[data-namespace='user:ana']").count() == 1

        page.click("#sign-out")  # the same tab, another person
        assert page.locator(".answer").count() == 0 and page.locator("#key").is_visible()
        assert not page.locator("#app").is_visible()
        sign_in(page, web[2]["bob"], "bob")
        page.locator("#no-documents").wait_for()
        assert page.locator("tbody.document").count() == 0
        corpora = page.locator("#corpora label").all_inner_texts()
        assert len(corpora) == 2 and "user:bob" in corpora[0] and "handbook" in corpora[1]
        theirs = ask(page, "Where is the spare key of the clock tower?")
        namespaces = {s.get_attribute("data-namespace")
                      for s in theirs.locator(".source").all()}
        assert namespaces <= {"handbook"}
        assert "third step" not in theirs.inner_text()
    finally:
        with api(web, "ana") as ana:
            ana.delete("/v1/documents/ana-secret.txt")


@pytest.mark.browser
def test_job_progress_shows_atoms_done_of_total_and_an_eta(page):
    """The page's own progress line, fed two polls of a running job 2 s apart (4 atoms in
    2 s: 5 left take about 3 s)."""
    shown = page.evaluate("""() => {
        const bar = document.createElement("progress"), status = document.createElement("p");
        const seen = { t: 0, done: 0 };
        showJob({ status: "queued", atoms_done: 0, atoms_total: 0 }, bar, status, seen);
        const queued = status.textContent;
        showJob({ status: "running", atoms_done: 1, atoms_total: 10 }, bar, status, seen);
        const first = status.textContent;
        seen.t -= 2000;
        showJob({ status: "running", atoms_done: 5, atoms_total: 10 }, bar, status, seen);
        return [queued, first, status.textContent, bar.value, bar.max];
    }""")
    assert shown == ["queued", "compiling: 1 / 10 atoms",
                     "compiling: 5 / 10 atoms, about 3 s left", 5, 10]
