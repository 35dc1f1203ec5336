"""The live voice chat page at / in a real headless Chromium (driven by playwright, the system's
/usr/bin/chromium): its fake microphone plays a mini-speech utterance, the test clicks Talk, then Stop & send,
and waits (bounded) for the answer's transcript and audio, counted by the page in window.vitaStats. A
screenshot of the page goes to the test's tmp folder."""
from __future__ import annotations

import shutil
import time

import pytest
import soundfile

from serve_testing import API_KEY

CHROMIUM = "/usr/bin/chromium"
UTTERANCE = "corpora/mini-speech/LibriSpeech/dev-clean-mini/1000/5000/1000-5000-0000.flac"
SPEAK_S = 2.0  # seconds of the utterance to send (under the tests' max_audio_seconds)

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                                 reason=f"{CHROMIUM} is missing (apt-get install -y chromium)")]


@pytest.fixture(scope="module")
def page(serve_url, shared_dir, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    tmp = tmp_path_factory.mktemp("chromium")
    pcm, rate = soundfile.read(shared_dir / UTTERANCE, dtype="int16")
    soundfile.write(tmp / "mic.wav", pcm, rate, subtype="PCM_16")
    flags = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
             f"--use-file-for-fake-audio-capture={tmp / 'mic.wav'}", "--autoplay-policy=no-user-gesture-required",
             "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(tmp / "profile"), executable_path=CHROMIUM, headless=True,
                                                       args=flags, timeout=60_000)
        try:
            tab = browser.new_page()
            tab.goto(serve_url + "/", timeout=30_000)
            yield tab
        finally:
            browser.close()


def stats(page) -> dict:
    return page.evaluate("window.vitaStats")


def wait_for(page, condition, what: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while not condition(current := stats(page)):
        assert not current["errors"], current["errors"]
        assert time.monotonic() < deadline, f"no {what} after {timeout:g} s: {current}"
        time.sleep(0.2)
    return current


def test_talk_button_sends_speech_and_plays_the_answer(page, tmp_path):
    page.click("summary")
    page.fill("#key", API_KEY)
    page.click("#talk")
    wait_for(page, lambda s: s["connected"] and s["sentSeconds"] >= SPEAK_S, "microphone audio sent", 30)
    page.click("#talk")
    done = wait_for(page, lambda s: s["responsesDone"] >= 1, "response", 180)
    assert done["audioDeltas"] > 0 and done["audioSamples"] > 0 and done["transcriptChars"] > 0, done
    wait_for(page, lambda s: s["played"] >= 1, "audio played", 30)
    transcript = page.inner_text("#log .assistant .text")
    assert transcript.strip() and page.inner_text("#error") == ""
    assert page.inner_text("#log .user .text").startswith("(spoke for")
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'page.png'}")


def test_typed_message_gets_a_text_answer(page):
    before = stats(page)["responsesDone"]
    page.uncheck("#speak")
    page.fill("#text", "Hello there")
    page.click("#typed button")
    done = wait_for(page, lambda s: s["responsesDone"] > before, "typed answer", 120)
    assert page.locator("#log .assistant").count() == 2 and not done["errors"]
