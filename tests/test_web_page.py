"""The live voice chat page at / in a real headless Chromium (driven by playwright, the system's
/usr/bin/chromium), counted by the page itself in window.vitaStats; every wait is bounded.

Hands-free (the default): a fake microphone plays a recording of three mini-speech questions (A, a pause
(PAUSE_S), B, then C while B's answer plays): the server's VAD finds the turns, both answers play, C interrupts
B's answer (the page stops it, marks it in the transcript pane, strikes through the part of its transcript that
was not heard and truncates it to what it played: the heard part is what the server's conversation keeps), the
user's turns are transcribed, no "(speaking…)" row is left; a screenshot is kept in test-artifacts/. A speech
the server does not commit (too short for a turn: speech_stopped, no committed) leaves no row. Push-to-talk (the
toggle): Talk, then Stop & send, and the answer's transcript and audio. Also: a message typed during an answer
waits for it and is answered; opened from a non-secure origin (http:// at a non-loopback address, reached through
a loopback proxy) the page says the microphone needs https or localhost, and typed messages still work."""
from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import soundfile

from serve_testing import API_KEY

CHROMIUM = "/usr/bin/chromium"
UTTERANCE = "corpora/mini-speech/LibriSpeech/dev-clean-mini/1000/5000/1000-5000-0000.flac"
SPEAK_S = 2.0  # seconds of the utterance to send (under the tests' max_audio_seconds)
QUESTIONS = "corpora/mini-speech/qa_wavs/q0{}.wav"
# Fixed times in a file, on a machine whose speed varies: the pauses leave room for slow answers. Between A and
# B: the VAD's 500 ms pause and A's answer's time to first audio (0.6-2.6 s measured on a 2-core machine at load
# 10-30, none in 3.5 s at load 80) must fit, else B's speech cancels A's answer before any of it is heard (the
# 1.5 s of the SDK test, tests/test_realtime_vad.py, is stretched there while the answer plays; a file cannot).
PAUSE_S = 8.0
# from the end of B to the start of C: room for B's answer's first audio (as above), and short enough that the
# answer (the tests' max tokens: about 7 s of audio) is still being made or played then, so C speaks over it
INTERRUPT_AFTER_S = 4.0
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                                 reason=f"{CHROMIUM} is missing (apt-get install -y chromium)")]


INSECURE_HOST = "10.254.0.1"  # a non-loopback address: a page there is not a secure context


class LoopbackProxy:
    """An HTTP proxy on loopback that sends every request to one local port (plain requests rewritten, CONNECT
    tunnels for the WebSocket): Chromium opens the page at a non-loopback address, which browsers treat as an
    insecure origin, and still reaches the test's server. Runs on its own thread; stops with the block."""

    def __init__(self, target_port: int):
        self.target_port, self.port = target_port, None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        server = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._client, "127.0.0.1", 0), self.loop)
        self.server = server.result(timeout=10)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc):
        async def stop():
            self.server.close()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    async def _client(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, _, headers = head[:-4].partition(b"\r\n")
            method, target, version = line.split(b" ", 2)
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except (OSError, ValueError, asyncio.IncompleteReadError):
            writer.close()
            return
        if method == b"CONNECT":
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:  # absolute-form to origin-form, one request per connection
            parts = urlsplit(target.decode())
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            kept = [h for h in headers.split(b"\r\n") if not h.lower().startswith((b"connection:", b"proxy-"))]
            up_writer.write(b"\r\n".join([f"{method.decode()} {path} ".encode() + version, *kept,
                                           b"Connection: close"]) + b"\r\n\r\n")
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader, writer) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@contextlib.contextmanager
def chromium(folder: Path, microphone: str, proxy_port: int | None = None):
    """Chromium whose fake microphone plays `microphone` (a wav; `FILE%noloop` plays it once, then silence);
    with `proxy_port`, addresses outside loopback go through that proxy."""
    from playwright.sync_api import sync_playwright

    flags = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
             f"--use-file-for-fake-audio-capture={microphone}", "--autoplay-policy=no-user-gesture-required",
             "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    if proxy_port is not None:
        flags.append(f"--proxy-server=http://127.0.0.1:{proxy_port}")  # loopback pages bypass it
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(folder / "profile"), executable_path=CHROMIUM,
                                                       headless=True, args=flags, timeout=60_000)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def browser(serve_url, shared_dir, tmp_path_factory):
    """Chromium with a fake microphone playing one utterance in a loop; addresses outside loopback go through a
    LoopbackProxy to the server."""
    tmp = tmp_path_factory.mktemp("chromium")
    pcm, rate = soundfile.read(shared_dir / UTTERANCE, dtype="int16")
    soundfile.write(tmp / "mic.wav", pcm, rate, subtype="PCM_16")
    with LoopbackProxy(urlsplit(serve_url).port) as proxy, chromium(tmp, str(tmp / "mic.wav"), proxy.port) as context:
        yield context


@pytest.fixture(scope="module")
def page(browser, serve_url):
    tab = browser.new_page()
    tab.goto(serve_url + "/", timeout=30_000)
    return tab


def stats(page) -> dict:
    return page.evaluate("window.vitaStats")


def wait_for(page, condition, what: str, timeout: float, errors: int = 0) -> dict:
    """Poll the page's stats (bounded) until `condition`; more than `errors` errors on the page fail at once."""
    deadline = time.monotonic() + timeout
    while not condition(current := stats(page)):
        assert len(current["errors"]) <= errors, current["errors"]
        assert time.monotonic() < deadline, f"no {what} after {timeout:g} s: {current}"
        time.sleep(0.2)
    return current


def retrieve(page, item_id: str) -> dict:
    """The item as the server's conversation holds it (conversation.item.retrieve on the page's socket)."""
    return page.evaluate("""(itemId) => new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("no conversation.item.retrieved in 30 s")), 30000);
      const listen = (m) => {
        const event = JSON.parse(m.data);
        if (event.type === "conversation.item.retrieved" && event.item.id === itemId) resolve(event.item);
        else if (event.type === "error") reject(new Error(event.error.message));
        else return;
        clearTimeout(timer); ws.removeEventListener("message", listen);
      };
      ws.addEventListener("message", listen);
      ws.send(JSON.stringify({ type: "conversation.item.retrieve", item_id: itemId }));
    })""", item_id)


def recording(shared_dir: Path, path: Path) -> Path:
    """A, PAUSE_S of silence, B, INTERRUPT_AFTER_S of silence, C, then silence: one 16 kHz wav."""
    rate = 16000
    first, second, third = (soundfile.read(shared_dir / QUESTIONS.format(n), dtype="int16") for n in (1, 2, 3))
    assert {first[1], second[1], third[1]} == {rate}

    def silence(seconds: float) -> np.ndarray:
        return np.zeros(int(seconds * rate), np.int16)

    soundfile.write(path, np.concatenate([silence(1.0), first[0], silence(PAUSE_S), second[0],
                                          silence(INTERRUPT_AFTER_S), third[0], silence(2.0)]), rate,
                    subtype="PCM_16")
    return path


@pytest.mark.slow
def test_hands_free_answers_each_pause_and_speech_interrupts_the_answer(serve_url, shared_dir, tmp_path):
    mic = recording(shared_dir, tmp_path / "hands-free.wav")
    with chromium(tmp_path, f"{mic}%noloop") as context:
        tab = context.new_page()
        tab.goto(serve_url + "/", timeout=30_000)
        assert not tab.is_checked("#ptt") and tab.inner_text("#talk") == "Start talking"  # hands-free by default
        tab.click("summary")
        tab.fill("#key", API_KEY)
        tab.click("#talk")
        wait_for(tab, lambda s: s["speechStarted"] >= 3 and s["responsesDone"] >= 2, "C over B's answer", 180)
        done = wait_for(tab, lambda s: s["userTranscripts"] >= 3, "the user's transcripts", 120)
        print("page stats:", {k: v for k, v in done.items() if k != "errors"})
        assert done["handsFree"] and done["speechStopped"] >= 3 and done["turns"] >= 2
        first, second = done["answers"][:2]
        # A's answer was heard (whole, or until B began); C spoke over B's answer while it played, and the page
        # told the server what it played of it
        assert first["heardMs"] > 0 and first["status"] in ("completed", "incomplete", "cancelled"), first
        # C came while B's answer was being made (the server cancels it) or, made already, still played (the page
        # stops it; the truncate keeps what was heard)
        being_made = (second["status"], second["reason"]) == ("cancelled", "turn_detected")
        still_playing = second["status"] in ("completed", "incomplete") and second["heardMs"] < second["receivedMs"]
        assert second["heardMs"] > 0 and (being_made or still_playing), second
        assert done["answersPlayed"] >= 2 and done["interrupted"] >= 1 and done["truncates"] >= 1, done
        rows = tab.locator("#log .assistant")
        assert "interrupted" in (rows.nth(1).get_attribute("class") or "")
        assert "interrupted" in rows.nth(1).inner_text()
        # B's transcript: what the user heard plain, the rest (positioned in the audio after the ms played)
        # struck through; the heard part is what the server's conversation keeps of the answer after the truncate
        text = rows.nth(1).locator(".text")
        whole, struck = text.text_content(), "".join(text.locator("del.unheard").all_text_contents())
        heard = whole[:len(whole) - len(struck)]
        print("B's answer: heard", repr(heard), "struck", repr(struck))
        assert whole.endswith(struck) and (second["heardChars"], second["chars"]) == (len(heard), len(whole))
        kept = retrieve(tab, second["itemId"])
        assert kept["status"] == "incomplete" and kept["content"][0]["transcript"] == heard, (kept, heard)
        # it spoke before C came (heardMs > 0), and a step's text comes before its audio: the text of the first
        # audio was heard; its text beyond what played is struck, unless all of it came before the audio that
        # was playing when C came (then all of it was heard)
        assert heard, f"{second['heardMs']} ms of B's answer heard, yet none of its text: {second}"
        assert struck or second["lastTextAtMs"] < second["heardMs"], second
        said = [t.strip() for t in tab.locator("#log .user .text").all_inner_texts()]
        assert len(said) >= 3 and all(said) and "(speaking…)" not in said, said
        # the readout: end of speech -> first answer audio, for each answer heard
        assert len(done["latencyMs"]) >= 2 and "first answer audio" in tab.inner_text("#latency")
        assert not done["errors"] and tab.inner_text("#error") == ""  # the truncates were taken
        ARTIFACTS.mkdir(exist_ok=True)
        for path in (ARTIFACTS / "web-page-hands-free.png", tmp_path / "web-page-hands-free.png"):
            tab.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {ARTIFACTS / 'web-page-hands-free.png'}")


def test_talk_button_sends_speech_and_plays_the_answer(page, tmp_path):
    page.click("summary")
    page.fill("#key", API_KEY)
    page.check("#ptt")  # push-to-talk
    assert page.inner_text("#talk") == "Talk"
    page.click("#talk")
    wait_for(page, lambda s: s["connected"] and s["sentSeconds"] >= SPEAK_S, "microphone audio sent", 30)
    page.click("#talk")
    done = wait_for(page, lambda s: s["responsesDone"] >= 1, "response", 180)
    assert done["audioDeltas"] > 0 and done["audioSamples"] > 0 and done["transcriptChars"] > 0, done
    wait_for(page, lambda s: s["played"] >= 1, "audio played", 30)
    transcript = page.inner_text("#log .assistant .text")
    assert transcript.strip() and page.inner_text("#error") == ""
    wait_for(page, lambda s: s["userTranscripts"] >= 1, "the turn's transcript", 60)
    turn = page.inner_text("#log .user .text")  # "(spoke for 2.0 s)" until its transcript came
    assert turn.strip() and not turn.startswith("(spoke for")
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'page.png'}")


def test_typed_message_gets_a_text_answer(page):
    before = stats(page)["responsesDone"]
    page.uncheck("#speak")
    page.fill("#text", "Hello there")
    page.click("#typed button")
    done = wait_for(page, lambda s: s["responsesDone"] > before, "typed answer", 120)
    assert page.locator("#log .assistant").count() == 2 and not done["errors"]


def test_a_message_typed_during_an_answer_waits_for_it_and_is_answered(page):
    page.uncheck("#speak")
    before, answers = stats(page), page.locator("#log .assistant").count()
    # both sent as one task: the second comes while the first is answered however fast the answer is (two
    # clicks would race it: on a loaded machine the first answer can end before the second click lands)
    page.evaluate("""() => { for (const text of ["Tell me a story.", "And then?"]) {
      document.getElementById("text").value = text; document.getElementById("typed").requestSubmit(); } }""")
    done = wait_for(page, lambda s: s["responsesDone"] >= before["responsesDone"] + 2, "both answers", 240)
    assert done["queued"] == before["queued"] + 1 and done["turns"] == before["turns"] + 2
    assert page.locator("#log .assistant").count() == answers + 2 and page.locator("#log .queued").count() == 0
    assert [t.strip() for t in page.locator("#log .user .text").all_inner_texts()[-2:]] == ["Tell me a story.",
                                                                                             "And then?"]


def test_a_speech_the_server_does_not_commit_leaves_no_row(browser, serve_url):
    """The server's events for a speech too short to be a turn (serve.realtime.Session._end_speech: speech_stopped,
    no committed, no item), given to the page's event handler: the page's VAD settings (300 ms of prefix padding,
    500 ms of silence in every clip) never make so short a clip, so a recording cannot reach it."""
    tab = browser.new_page()
    tab.goto(serve_url + "/", timeout=30_000)

    def given(*events):
        tab.evaluate("(events) => events.forEach(onEvent)", [{"event_id": f"event_{n}", **e}
                                                            for n, e in enumerate(events)])

    def speech(kind: str, item_id: str, ms: int) -> dict:
        return {"type": f"input_audio_buffer.speech_{kind}", "item_id": item_id,
                f"audio_{'start' if kind == 'started' else 'end'}_ms": ms}

    def rows() -> list[str]:
        return [t.strip() for t in tab.locator("#log .user .text").all_text_contents()]

    committed = {"type": "input_audio_buffer.committed", "item_id": "item_b", "previous_item_id": None}
    given(speech("started", "item_a", 1000), speech("stopped", "item_a", 1040), speech("started", "item_b", 3000))
    assert rows() == ["(speaking…)"] and stats(tab)["speechDropped"] == 1  # item_a's row went at the next event
    given(speech("stopped", "item_b", 4000), committed)
    assert rows() == ["(transcribing…)"]
    given({"type": "conversation.item.input_audio_transcription.completed", "item_id": "item_b",
           "content_index": 0, "transcript": "hello"})
    assert rows() == ["hello"]
    given(speech("started", "item_c", 6000), speech("stopped", "item_c", 6040))  # and then nothing
    wait_for(tab, lambda s: s["speechDropped"] == 2, "the last uncommitted speech's row gone", 30)
    assert rows() == ["hello"] and not stats(tab)["errors"]
    tab.close()


def test_an_insecure_origin_says_the_mic_needs_https_and_typed_messages_work(browser, serve_url):
    tab = browser.new_page()
    tab.goto(f"http://{INSECURE_HOST}:{urlsplit(serve_url).port}/", timeout=30_000)
    assert tab.evaluate("window.isSecureContext") is False
    notice = tab.inner_text("#notice")
    assert "https://" in notice and "localhost" in notice and "Typed messages work" in notice
    tab.click("summary")
    tab.fill("#key", API_KEY)
    tab.click("#talk")
    error = tab.inner_text("#error")
    assert "microphone needs a secure page" in error and "addModule" not in error
    tab.uncheck("#speak")
    tab.fill("#text", "Hello there")
    tab.click("#typed button")
    wait_for(tab, lambda s: s["responsesDone"] >= 1, "typed answer on an insecure origin", 120, errors=1)
    assert tab.locator("#log .assistant").count() == 1
    assert tab.inner_text("#error") == ""  # the new turn cleared the old error
    tab.close()
