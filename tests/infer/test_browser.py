"""The chat page at `/` in headless Chromium (Selenium + Debian's chromium/chromedriver): a streamed reply,
multi-turn history and the reset button, checked against the same server's non-streaming API.

Skips only when the chromium or chromedriver binary is missing (`.ci/run` installs both with apt).
"""

from __future__ import annotations

import json
import shutil
import time

import httpx
import pytest
import torch

from scratchllm.config import model_preset
from scratchllm.infer.server import create_app
from scratchllm.model.gpt import GPT

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if path is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"{' and '.join(MISSING)} not found on PATH (apt-get install chromium chromium-driver)")

MAX_TOKENS = 24
# Seeded sampling rather than greedy: the random-init model's greedy reply is one token repeated (newlines).
SAMPLING = {"temperature": 0.8, "top_p": 0.9, "seed": 7}
PACE_S = 0.01


def paced_gpt(config) -> GPT:
    """A tiny model that takes PACE_S per forward, like a real-size one: the tiny model alone decodes a whole
    reply in a few milliseconds, and the browser could then read every chunk in one go, proving nothing. A hook,
    not a forward override, so the server runs it on its real (slot-cache) path."""
    model = GPT(config)
    model.embed_tokens.register_forward_pre_hook(lambda *_: time.sleep(PACE_S))
    return model


class RecordChatRequests:
    """ASGI wrapper that keeps the JSON body of every /v1/chat/completions request: what the page really sent."""

    def __init__(self, app) -> None:
        self.app, self.bodies, self.authorizations = app, [], []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        self.authorizations.append(dict(scope["headers"]).get(b"authorization", b"").decode())
        chunks: list[bytes] = []

        async def recording_receive():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.bodies.append(json.loads(b"".join(chunks)))
            return message

        return await self.app(scope, recording_receive, send)


@pytest.fixture(scope="module")
def server(serve, chat_tokenizer) -> tuple[str, RecordChatRequests]:
    tok = chat_tokenizer
    torch.manual_seed(0)
    model = paced_gpt(model_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=512)).eval()
    app = RecordChatRequests(create_app(model, tok, "tiny", max_batch=8, max_queue=64))
    return serve(app), app


@pytest.fixture(scope="module")
def keyed_server(serve, chat_tokenizer) -> tuple[str, RecordChatRequests]:
    tok = chat_tokenizer
    torch.manual_seed(0)
    model = paced_gpt(model_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=512)).eval()
    app = RecordChatRequests(create_app(model, tok, "tiny", api_key="sekret"))
    return serve(app), app


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # subtle: CI runs as root in a container: Chromium refuses root without --no-sandbox, and /dev/shm is small
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1000,800"):
        options.add_argument(flag)
    # An explicit driver path keeps Selenium Manager from trying to download one (no internet in CI).
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def _api_reply(base: str, sent: dict) -> str:
    """The same request the page sent, non-streaming: the page must show exactly this text."""
    r = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={**sent, "stream": False})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def _set(driver, element_id: str, value: str) -> None:
    field = driver.find_element("id", element_id)
    field.clear()
    field.send_keys(value)


# Records every text the newest reply line shows, one entry per MutationObserver callback (a callback runs once per
# task that changed the DOM, so chunks that arrive separately give separate entries).
WATCH_JS = """
window.snapshots = [];
new MutationObserver(() => {
  const replies = document.querySelectorAll('#log .assistant');
  if (replies.length) window.snapshots.push(replies[replies.length - 1].textContent);
}).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
"""


def _say(driver, text: str) -> list[str]:
    """Type `text`, press Enter, wait for the reply to finish; returns the reply line's texts as they appeared."""
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    n_replies = len(driver.find_elements("css selector", "#log .assistant"))
    driver.execute_script("window.snapshots = [];")
    driver.find_element("id", "msg").send_keys(text, Keys.ENTER)
    WebDriverWait(driver, 60).until(
        lambda d: len(d.find_elements("css selector", "#log .assistant")) == n_replies + 1
        and d.find_element("id", "form").get_attribute("data-state") == "idle")
    return driver.execute_script("return window.snapshots;")


def _lines(driver) -> list[str]:
    return [e.text for e in driver.find_elements("css selector", "#log > div")]


def _open(driver, base: str) -> None:
    driver.get(base + "/")
    for name, value in {**SAMPLING, "max_tokens": MAX_TOKENS}.items():  # so the reply can be checked with the API
        _set(driver, name, str(value))
    driver.execute_script(WATCH_JS)


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def test_page_streams_reply_token_by_token(server, browser) -> None:
    base, recorder = server
    _open(browser, base)
    assert browser.find_element("id", "reset").is_displayed()
    for setting in ("temperature", "top_p", "max_tokens", "seed"):
        assert browser.find_element("id", setting).is_displayed()

    snapshots = _say(browser, "hello")
    sent = recorder.bodies[-1]
    assert sent == {"model": "tiny", "messages": [_user("hello")], "stream": True, "max_tokens": MAX_TOKENS, **SAMPLING}
    expected = _api_reply(base, sent)
    assert len(expected.strip()) >= 5, f"the seeded tiny model should say something, said {expected!r}"
    final = "bot: " + expected
    assert [r.get_attribute("textContent") for r in browser.find_elements("css selector", "#log .assistant")] == [final]
    # Streamed: before the end the reply line showed a non-empty, strictly shorter prefix of the final reply,
    # and what it showed only ever grew.
    partial = [s for s in snapshots if len("bot: ") < len(s) < len(final) and final.startswith(s)]
    assert partial, f"no intermediate DOM update before the final reply; saw {snapshots!r}"
    grown = [s for s in snapshots if s != "bot: "]
    assert all(b.startswith(a) for a, b in zip(grown, grown[1:])), grown
    assert grown[-1] == final


def test_multi_turn_then_reset_clears_conversation(server, browser) -> None:
    base, recorder = server
    _open(browser, base)
    first = _say(browser, "hello")[-1].removeprefix("bot: ")
    second = _say(browser, "the answer is")[-1].removeprefix("bot: ")
    sent = recorder.bodies[-1]
    assert sent["messages"] == [_user("hello"), {"role": "assistant", "content": first}, _user("the answer is")]
    assert second == _api_reply(base, sent)
    assert len(browser.find_elements("css selector", "#log .user")) == 2

    browser.find_element("id", "reset").click()
    assert _lines(browser) == []
    # The history went too, not just the text on screen.
    again = _say(browser, "the answer is")[-1].removeprefix("bot: ")
    assert recorder.bodies[-1]["messages"] == [_user("the answer is")]
    assert again == _api_reply(base, recorder.bodies[-1])
    assert len(browser.find_elements("css selector", "#log .user")) == 1


def test_reset_during_a_streamed_reply_drops_it_and_frees_the_slot(server, browser) -> None:
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    base, recorder = server
    _open(browser, base)
    _set(browser, "max_tokens", "400")  # ≥ 4 s of decoding at PACE_S: still streaming when reset is clicked
    browser.find_element("id", "msg").send_keys("hello", Keys.ENTER)
    WebDriverWait(browser, 30).until(lambda d: len(d.execute_script("return window.snapshots;")) > 2)
    browser.find_element("id", "reset").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element("id", "form").get_attribute("data-state") == "idle")
    # The page aborted its fetch; the server notices the disconnect and stops that row long before 400 tokens.
    WebDriverWait(browser, 2, poll_frequency=0.05).until(
        lambda _: httpx.get(base + "/health").json()["decoding"] == 0)
    time.sleep(0.3)  # a late chunk of the aborted reply would land now
    assert _lines(browser) == []

    _set(browser, "max_tokens", str(MAX_TOKENS))
    again = _say(browser, "hello")[-1].removeprefix("bot: ")
    assert recorder.bodies[-1]["messages"] == [_user("hello")]
    assert again == _api_reply(base, recorder.bodies[-1])


def test_page_with_api_key_asks_for_it_then_works_and_keeps_it_in_the_browser(keyed_server, browser) -> None:
    """The old page read `models.data[0]` from a 401 answer: "Cannot read properties of undefined"."""
    base, recorder = keyed_server
    _open(browser, base)
    browser.execute_script("localStorage.removeItem('scratchllm_api_key');")
    _set(browser, "api_key", "")
    _say(browser, "hello")
    error = browser.find_elements("css selector", "#log .assistant")[-1].text
    assert "[error]" in error and "API key" in error and "undefined" not in error

    browser.find_element("id", "reset").click()
    _set(browser, "api_key", "sekret")
    reply = _say(browser, "hello")[-1].removeprefix("bot: ")
    assert recorder.authorizations[-1] == "Bearer sekret"
    r = httpx.post(f"{base}/v1/chat/completions", timeout=60, headers={"Authorization": "Bearer sekret"},
                   json={**recorder.bodies[-1], "stream": False})
    assert reply == r.json()["choices"][0]["message"]["content"] and len(reply) > 0
    assert browser.execute_script("return localStorage.getItem('scratchllm_api_key');") == "sekret"
    browser.get(base + "/")  # a reload finds the key in this browser
    assert browser.find_element("id", "api_key").get_attribute("value") == "sekret"
