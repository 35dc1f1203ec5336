"""OpenAI parity through the unchanged openai SDK on the shared Serve app: pcm at OpenAI's 24 kHz from speech
(raw and SSE) and chat (pcm16, streamed and not) — the same greedy request's wav (22.05 kHz, rate in its header)
lasts as long and sounds the same —, srt / vtt transcripts, models.retrieve, and the OpenAI fields the model
cannot honour refused with a 400 naming them (never silently ignored)."""
from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
import soundfile

from serve_testing import API_KEY, clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PCM_RATE = 24000
TEXT = "Hello there."
TOKENS = 48
MAX_GAP_S = 0.003  # pcm vs wav duration: soxr rounds to whole output samples


@pytest.fixture(scope="module")
def client(serve_url):
    import openai

    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def wav_audio(data: bytes) -> tuple[np.ndarray, int]:
    pcm, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert rate == 22050 and len(pcm) > 0
    return pcm, rate


def assert_same_audio_at_24k(pcm_bytes: bytes, wav: np.ndarray, wav_rate: int) -> None:
    """The pcm lasts as long as the wav (not 22.05/24 of it: played at 24 kHz, the speed is right) and is the wav's
    audio at 24 kHz (the wav resampled and clipped here matches it within the 16-bit rounding of both)."""
    import soxr

    assert len(pcm_bytes) % 2 == 0
    pcm = np.frombuffer(pcm_bytes, "<i2").astype(np.float32) / 32767.0
    assert abs(len(pcm) / PCM_RATE - len(wav) / wav_rate) < MAX_GAP_S, (len(pcm), len(wav))
    reference = np.clip(soxr.resample(wav, wav_rate, PCM_RATE), -1.0, 1.0)  # resampling may overshoot full scale
    n = min(len(reference), len(pcm))
    assert n >= len(pcm) - 1 and np.abs(reference[:n] - pcm[:n]).max() < 0.002


@pytest.fixture(scope="module")
def speech_wav(client) -> tuple[np.ndarray, int]:
    audio = client.audio.speech.create(model="vita-audio", voice="alloy", input=TEXT, response_format="wav",
                                       extra_body={"max_new_tokens": TOKENS})
    return wav_audio(audio.content)


def test_speech_pcm_is_24khz(client, speech_wav):
    audio = client.audio.speech.create(model="vita-audio", voice="alloy", input=TEXT, response_format="pcm",
                                       extra_body={"max_new_tokens": TOKENS})
    assert_same_audio_at_24k(audio.content, *speech_wav)


def test_speech_pcm_streamed_and_sse_are_the_same_24khz_audio(client, speech_wav):
    with client.audio.speech.with_streaming_response.create(model="vita-audio", voice="alloy", input=TEXT,
                                                            response_format="pcm",
                                                            extra_body={"max_new_tokens": TOKENS}) as response:
        chunks = list(response.iter_bytes(4096))
    streamed = b"".join(chunks)
    assert_same_audio_at_24k(streamed, *speech_wav)
    sse = client.audio.speech.create(model="vita-audio", voice="alloy", input=TEXT, response_format="pcm",
                                     stream_format="sse", extra_body={"max_new_tokens": TOKENS})
    events = [json.loads(line[6:]) for line in sse.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    deltas = [base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) > 1 and b"".join(deltas) == streamed  # chunk by chunk, one soxr stream: no seams


def _chat(client, **fields):
    return client.chat.completions.create(model="vita-audio", modalities=["text", "audio"], max_tokens=TOKENS,
                                          messages=[{"role": "user", "content": "Say something."}], **fields)


def test_chat_pcm16_is_24khz_streamed_or_not(client):
    wav = _chat(client, audio={"voice": "alloy", "format": "wav"}).choices[0].message.audio
    pcm = _chat(client, audio={"voice": "alloy", "format": "pcm16"}).choices[0].message.audio
    assert pcm.transcript == wav.transcript
    wav_pcm, wav_rate = wav_audio(base64.b64decode(wav.data))
    assert_same_audio_at_24k(base64.b64decode(pcm.data), wav_pcm, wav_rate)
    stream = _chat(client, audio={"voice": "alloy", "format": "pcm16"}, stream=True)
    audios = [c.choices[0].delta.audio for c in stream if c.choices and getattr(c.choices[0].delta, "audio", None)]
    streamed = b"".join(base64.b64decode(a.data) for a in audios if a.data)
    assert streamed == base64.b64decode(pcm.data)


# -- transcripts as subtitles ------------------------------------------------------------------------------

SRT_CUE = re.compile(r"(\d+)\n(\d\d):(\d\d):(\d\d),(\d{3}) --> (\d\d):(\d\d):(\d\d),(\d{3})\n((?:.+\n)+)")
VTT_CUE = re.compile(r"(\d\d):(\d\d):(\d\d)\.(\d{3}) --> (\d\d):(\d\d):(\d\d)\.(\d{3})\n((?:.+\n)+)")


def _seconds(h, m, s, ms) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def test_srt_and_vtt_parse_with_the_transcript_and_the_clips_timing(client):
    kwargs = dict(model="vita-audio", file=("clip.wav", clip(seconds=1.5), "audio/wav"),
                  extra_body={"max_new_tokens": 24})
    text = client.audio.transcriptions.create(**kwargs).text
    assert text.strip()
    srt = client.audio.transcriptions.create(response_format="srt", **kwargs)
    cues = SRT_CUE.findall(srt)
    assert cues and "".join(m.group(0) for m in SRT_CUE.finditer(srt)).strip() == srt.strip()
    assert [c[0] for c in cues] == [str(i + 1) for i in range(len(cues))]
    assert _seconds(*cues[0][1:5]) == 0.0 and _seconds(*cues[-1][5:9]) == pytest.approx(1.5, abs=1e-3)
    assert " ".join(c[9].strip() for c in cues) == " ".join(text.split())
    vtt = client.audio.transcriptions.create(response_format="vtt", **kwargs)
    assert vtt.startswith("WEBVTT\n\n")
    cues = VTT_CUE.findall(vtt)
    assert cues and "".join(m.group(0) for m in VTT_CUE.finditer(vtt)).strip() == vtt[len("WEBVTT"):].strip()
    assert _seconds(*cues[-1][4:8]) == pytest.approx(1.5, abs=1e-3)
    assert " ".join(c[8].strip() for c in cues) == " ".join(text.split())


def test_subtitle_text_never_breaks_a_cue():
    from serve.api import subtitles

    segments = [{"start": 3725.5, "end": 3726.0, "text": "a\n\n--> b"}, {"start": 0, "end": 1, "text": " \n"}]
    assert subtitles(segments, "srt") == "1\n01:02:05,500 --> 01:02:06,000\na\n-> b\n"
    assert subtitles(segments, "vtt") == "WEBVTT\n\n01:02:05.500 --> 01:02:06.000\na\n-> b\n"
    assert subtitles([], "srt") == "" and subtitles([], "vtt") == "WEBVTT\n\n"


# -- models ------------------------------------------------------------------------------------------------


def test_models_retrieve(client):
    import openai

    model = client.models.retrieve("vita-audio")
    assert model.id == "vita-audio" and model.object == "model"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-5")
    error = caught.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model" and "gpt-5" in error["message"]


# -- every accepted field honoured or refused ----------------------------------------------------------------


def test_transcription_language_of_the_model_is_honoured(client):
    result = client.audio.transcriptions.create(model="vita-audio", file=("clip.wav", clip(), "audio/wav"),
                                                language="en", response_format="verbose_json",
                                                extra_body={"max_new_tokens": 8})
    assert result.language == "english"


REFUSED = [
    ("speech instructions", "speech", {"instructions": "Speak like a pirate."}, "instructions"),
    ("speech speed", "speech", {"speed": 1.5}, "speed"),
    ("transcription prompt", "transcription", {"prompt": "Names: Ada, Grace."}, "prompt"),
    ("transcription language", "transcription", {"language": "fr"}, "language"),
    ("transcription word timestamps", "transcription", {"timestamp_granularities": ["word"]},
     "timestamp_granularities[]"),
    ("transcription timestamps outside verbose_json", "transcription", {"timestamp_granularities": ["segment"]},
     "timestamp_granularities[]"),
    ("transcription srt streamed", "transcription", {"response_format": "srt", "stream": True}, "response_format"),
    ("transcription keywords", "transcription", {"keywords": ["Ada"]}, "keywords[]"),
    ("chat store", "chat", {"store": True}, "store"),
    ("chat metadata", "chat", {"metadata": {"k": "v"}}, "metadata"),
    ("chat stop", "chat", {"stop": ["x"]}, "stop"),
    ("chat frequency_penalty", "chat", {"frequency_penalty": 0.5}, "frequency_penalty"),
]


@pytest.mark.parametrize("name,route,fields,param", REFUSED, ids=[r[0] for r in REFUSED])
def test_fields_the_model_cannot_honour_are_refused_naming_them(client, name, route, fields, param):
    import openai

    calls = {
        "speech": lambda: client.audio.speech.create(model="vita-audio", voice="alloy", input=TEXT, **fields),
        "transcription": lambda: client.audio.transcriptions.create(
            model="vita-audio", file=("clip.wav", clip(seconds=0.5), "audio/wav"), **fields),
        "chat": lambda: client.chat.completions.create(
            model="vita-audio", messages=[{"role": "user", "content": "hi"}], **fields),
    }
    with pytest.raises(openai.BadRequestError) as caught:
        result = calls[route]()
        list(result) if fields.get("stream") else None
    error = caught.value.body
    assert error["param"].split(".")[0] == param and param.rstrip("[]") in error["message"], error


def test_chat_user_is_accepted(client):
    """`user` (the end user's id, for the operator's abuse monitoring) is honoured: the replica's log names it."""
    response = client.chat.completions.create(model="vita-audio", messages=[{"role": "user", "content": "hi"}],
                                              user="user-1234", max_tokens=4, store=False)
    assert response.choices[0].message.content is not None
