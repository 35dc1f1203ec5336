"""`vita-audio bench realtime`: hands-free `/v1/realtime` (server VAD) through the unchanged openai SDK client,
with real-time (paced) microphone input, at 1, 4 and 8 concurrent sessions; against the in-process pipeline's
time to first audio for the same turn, in the same run.

On the tiny set unless --models is given, with a local Ray started here (or --address), the Serve app
(serve.app.build_app, as `bench serve` runs it) on 127.0.0.1.

The microphone: each session streams pcm16 at 24 kHz in --chunk-ms pieces at wall-clock pace (a piece is sent
when its last sample would have been captured; digital silence between utterances, as a muted room), with
`server_vad` (threshold 0.5, prefix_padding_ms 300, silence_duration_ms --silence-ms) and input transcription on
(the model's ASR runs beside each answer, as the hands-free page asks for it). A turn is the recording
mini-speech qa_wavs/q01 (a question, 2.2 s); the client waits until the answer is done and has played (first
audio delta + its audio length), then speaks the next turn. Each client runs --rounds sessions one after the
other, each of --turns turns then one barge-in; at N sessions, N clients start 1/N s apart.

End of user speech, two views, both recorded:
- client: the moment the piece holding the turn's last voiced sample was sent (voiced: a 10 ms window whose RMS
  is within 40 dB of the recording's loudest window; measured once on the recording);
- server: the moment the piece holding the sample at the server's `speech_stopped.audio_end_ms` was sent (where
  Silero's silence began, on the session's audio clock).
Latency = end of speech -> first `response.output_audio.delta` received; the report gives it minus the VAD
silence window (silence_duration_ms: the wait that defines the end of a turn). Target at 1 session (issue 28):
latency <= 1.2 x in-process TTFA + silence window.

In-process TTFA: the same turn as the server commits it (prefix_padding_ms of silence, the recording, then the
silence window) as a 24 kHz wav through `actors.local.LocalPipeline.chat` (the same `run_request` and stage classes,
no Ray, no HTTP, one torch thread), same max tokens; request start -> first audio chunk. At 1 session the
in-process runs alternate with the realtime sessions (one session, then --turns in-process requests), so the
machine's drift falls on both; the first turn of every session has no history, like the in-process request
(later turns carry the earlier turns in their prompt and are reported apart).

Barge-in: after --turns, the session asks for an unbounded answer (max_output_tokens "inf"), speaks the turn
again and, --barge-in-after-s after the answer's first audio delta, speaks q02. Reaction = the first voiced sample
of q02 sent -> the last audio delta of the cancelled answer received (the summaries count a reaction <= 0,
no delta after the speech began, as 0); also -> its `response.done` (status cancelled, reason turn_detected)
and the number of its deltas received after that `response.done` (must be 0).

The VAD's own cost: actors.vad.SpeechDetector over the recording in --chunk-ms pieces, in this process (CPU
and wall ms per 32 ms frame, resampling included), on one torch thread (as in the ingress replica: Ray sets
OMP_NUM_THREADS=1 in a num_cpus=0 actor) and on torch's default threads.

Where the time goes at 1 session: the latency split at the server's events (end of speech -> speech_stopped
received: the VAD window and its detection; speech_stopped -> response.created: commit and plan;
response.created -> first delta: admission, encoder, LLM, decoder, Serve's hops, anything queued before them),
beside the in-process request's own split (encoded, first audio codes, first PCM); and after each 1-session
session (and its in-process requests) one more with input transcription off (what the concurrent ASR costs).
Writes realtime.json, realtime.md and realtime.png.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import io
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.report import int_list, markdown_table, write_report

RATE = 24000  # the SDK's pcm16 rate
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpora" / "mini-speech" / "qa_wavs"
TURN, INTERRUPTION = "q01", "q02"
KEY = "bench-realtime-key"
TARGET = 1.2
VOICED_DB = 40.0
WAIT_S = 300.0  # any single wait (a loaded machine at 8 sessions)


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--models", type=Path, default=None, help="folder with llm/, encoder/, decoder/ (default: tiny)")
    parser.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local Ray")
    parser.add_argument("--sessions", default="1,4,8", help="concurrent sessions per level")
    parser.add_argument("--rounds", type=int, default=3, help="sessions each client runs one after the other")
    parser.add_argument("--turns", type=int, default=2, help="measured turns per session (then one barge-in)")
    parser.add_argument("--answer-tokens", type=int, default=32, help="max_output_tokens of a measured turn")
    parser.add_argument("--chunk-ms", type=int, default=40, help="microphone piece length (20-40 ms)")
    parser.add_argument("--silence-ms", type=int, default=500, help="server VAD silence_duration_ms")
    parser.add_argument("--barge-in-after-s", type=float, default=0.3,
                        help="the interruption starts this long after the answer's first audio delta")
    parser.add_argument("--quick", action="store_true", help="1 and 2 sessions, one turn each (a smoke run)")


def run(args: argparse.Namespace) -> dict:
    import ray
    import torch
    from ray import serve

    from actors.config import PipelineConfig
    from actors.local import LocalPipeline
    from actors.models import resolve_models_dir
    from actors.ray_runtime import free_port, start_ray
    from serve.proxy_errors import use_in_local_ray

    if args.quick:
        args.sessions, args.rounds, args.turns, args.answer_tokens = "1,2", 1, 1, 16
    levels = int_list(args.sessions, "--sessions")
    if not 20 <= args.chunk_ms <= 40:
        raise ValueError("--chunk-ms must be 20-40 (a microphone's piece)")
    if min(args.rounds, args.turns, args.answer_tokens) < 1 or args.silence_ms < 100:
        raise ValueError("--rounds, --turns and --answer-tokens must be >= 1, --silence-ms >= 100")
    models = resolve_models_dir(args.models)
    turn, interruption = _recording(TURN), _recording(INTERRUPTION)
    plan = Plan(turn, interruption, args)
    vad_cost = {"default_threads": _vad_cost(turn, args)}
    torch.set_num_threads(1)  # the in-process pipeline, as each Serve stage (torch_threads=1)
    vad_cost["one_thread"] = _vad_cost(turn, args)
    use_in_local_ray()
    started = start_ray(args.address)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    turns, barge, local, quiet = [], [], [], []
    pipe = LocalPipeline(PipelineConfig.from_models_dir(models))
    try:
        with tempfile.TemporaryDirectory(prefix="vita-bench-realtime-") as state:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            try:
                app_args = {"models": str(models), "max_tokens": 4096, "api_key": KEY, "state": state,
                            "llm": {"max_ongoing_requests": 64, "max_queued_requests": -1}}
                serve.run(_app(app_args), name="bench", route_prefix="/")
                _local_ttfa(pipe, plan)  # warm-ups (first-call costs of every stage)
                asyncio.run(_level(url, plan, 1, 1, warm_up=True))
                for sessions in levels:
                    if sessions == 1:  # alternating with the in-process requests and with the ASR off
                        for _ in range(args.rounds):
                            _collect(asyncio.run(_level(url, plan, 1, 1)), 1, turns, barge)
                            local += [_local_ttfa(pipe, plan) for _ in range(args.turns)]
                            _collect(asyncio.run(_level(url, plan, 1, 1, transcription=False)), 1, quiet, [])
                    else:
                        _collect(asyncio.run(_level(url, plan, sessions, args.rounds)), sessions, turns, barge)
                target = _target(turns, local, args.silence_ms)
            finally:
                serve.shutdown()
    finally:
        pipe.shutdown()
        if started:
            ray.shutdown()
    rows = [_summary(n, [t for t in turns if t["sessions"] == n], [b for b in barge if b["sessions"] == n],
                     args.silence_ms) for n in levels]
    load = os.getloadavg()
    results = {"levels": rows, "target": target, "breakdown": _breakdown(turns, quiet, local, args.silence_ms),
               "vad": vad_cost, "turns": turns, "barge_in": barge, "turns_without_transcription": quiet,
               "in_process": local, "protocol": plan.describe(), "models": str(models),
               "load_average": [round(x, 2) for x in load]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _plot(results, out / "realtime.png")
    write_report("realtime", results, _markdown(results, load), out)
    return results


# ---------------------------------------------------------------------------------------------------------
# The recordings and the plan of a session


@dataclass
class Recording:
    name: str
    pcm: np.ndarray  # int16 at RATE
    first_voiced: int  # sample index
    last_voiced: int


def _recording(name: str) -> Recording:
    import soundfile
    import soxr

    audio, rate = soundfile.read(CORPUS / f"{name}.wav", dtype="float32")
    pcm = (np.clip(soxr.resample(audio, rate, RATE), -1, 1) * 32767).astype(np.int16)
    window = RATE // 100
    frames = pcm[: len(pcm) // window * window].astype(np.float64).reshape(-1, window)
    rms = np.sqrt((frames ** 2).mean(axis=1))
    voiced = np.flatnonzero(rms >= rms.max() * 10 ** (-VOICED_DB / 20))
    return Recording(name, pcm, int(voiced[0] * window), int((voiced[-1] + 1) * window - 1))


@dataclass
class Plan:
    turn: Recording
    interruption: Recording
    args: argparse.Namespace

    def vad(self) -> dict:
        return {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                "silence_duration_ms": self.args.silence_ms}

    def committed_wav(self) -> bytes:
        """The turn as the server commits it: prefix padding, the recording, the silence window."""
        import soundfile

        vad = self.vad()
        pcm = np.concatenate([_silence(vad["prefix_padding_ms"] / 1000), self.turn.pcm,
                              _silence(vad["silence_duration_ms"] / 1000)])
        buffer = io.BytesIO()
        soundfile.write(buffer, pcm, RATE, format="WAV", subtype="PCM_16")
        return buffer.getvalue()

    def describe(self) -> dict:
        a = self.args
        return {"turn": self.turn.name, "turn_s": len(self.turn.pcm) / RATE,
                "turn_voiced_s": [self.turn.first_voiced / RATE, self.turn.last_voiced / RATE],
                "interruption": self.interruption.name, "chunk_ms": a.chunk_ms, "server_vad": self.vad(),
                "answer_tokens": a.answer_tokens, "rounds": a.rounds, "turns_per_session": a.turns,
                "barge_in_after_s": a.barge_in_after_s, "voiced": f"10 ms RMS within {VOICED_DB:g} dB of the peak",
                "quick": a.quick}


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.int16)


# ---------------------------------------------------------------------------------------------------------
# One session: a paced microphone, a listener, the turns


class Mic:
    """Sends what it is given to say at wall-clock pace (silence when there is nothing), one piece per chunk;
    remembers when each piece went, so a sample's index tells when it was sent."""

    def __init__(self, conn, chunk_ms: int):
        self.conn, self.step, self.chunk_s = conn, RATE * chunk_ms // 1000, chunk_ms / 1000
        self.pending = np.zeros(0, np.int16)
        self.ends: list[int] = []  # samples sent after each piece
        self.times: list[float] = []  # when each piece was sent (time.monotonic)

    @property
    def sent(self) -> int:
        return self.ends[-1] if self.ends else 0

    def say(self, pcm: np.ndarray) -> int:
        """Queue `pcm`; the index its first sample will have in the session's audio."""
        start = self.sent + len(self.pending)
        self.pending = np.concatenate([self.pending, pcm])
        return start

    def sent_at(self, index: int) -> float | None:
        """When the piece holding sample `index` was sent (None: not yet)."""
        at = bisect.bisect_right(self.ends, index)
        return self.times[at] if at < len(self.times) else None

    async def run(self) -> None:
        start, n = time.monotonic(), 0
        while True:
            n += 1
            await asyncio.sleep(max(0.0, start + n * self.chunk_s - time.monotonic()))
            piece, self.pending = self.pending[: self.step], self.pending[self.step:]
            piece = np.concatenate([piece, np.zeros(self.step - len(piece), np.int16)])
            await self.conn.input_audio_buffer.append(audio=base64.b64encode(piece.tobytes()).decode())
            self.ends.append(self.sent + self.step)
            self.times.append(time.monotonic())


@dataclass
class Answer:
    id: str
    created: float
    first_delta: float | None = None
    last_delta: float | None = None
    audio_s: float = 0.0
    done: float | None = None
    status: str | None = None
    reason: str | None = None
    deltas_after_done: int = 0


@dataclass
class Listener:
    """Every server event of a session, as it arrives (time.monotonic)."""

    answers: list[Answer] = field(default_factory=list)
    started: list[tuple[float, int]] = field(default_factory=list)  # (received, audio_start_ms)
    stopped: list[tuple[float, int]] = field(default_factory=list)  # (received, audio_end_ms)
    transcriptions: int = 0
    errors: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, conn) -> None:
        by_id: dict[str, Answer] = {}
        async for event in conn:
            now, kind = time.monotonic(), event.type
            if kind == "response.created":
                by_id[event.response.id] = Answer(event.response.id, now)
                self.answers.append(by_id[event.response.id])
            elif kind == "response.output_audio.delta" and event.response_id in by_id:
                answer = by_id[event.response_id]
                answer.first_delta = answer.first_delta or now
                answer.last_delta = now
                answer.audio_s += len(base64.b64decode(event.delta)) / 2 / RATE
                answer.deltas_after_done += answer.done is not None
            elif kind == "response.done" and event.response.id in by_id:
                answer = by_id[event.response.id]
                answer.done, answer.status = now, event.response.status
                details = event.response.status_details
                answer.reason = getattr(details, "reason", None) if details else None
            elif kind == "input_audio_buffer.speech_started":
                self.started.append((now, event.audio_start_ms))
            elif kind == "input_audio_buffer.speech_stopped":
                self.stopped.append((now, event.audio_end_ms))
            elif kind == "conversation.item.input_audio_transcription.completed":
                self.transcriptions += 1
            elif kind == "error":
                self.errors.append(f"{event.error.code}: {event.error.message}"[:200])
            self.changed.set()

    async def until(self, condition, what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not condition():
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"realtime bench: no {what} within {WAIT_S:g} s (errors: {self.errors[-3:]})")
            try:
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))
            except TimeoutError:
                pass


async def _session(url: str, plan: Plan, transcription: bool = True, warm_up: bool = False) -> dict:
    """One hands-free session: --turns measured turns, then a barge-in."""
    import openai

    args = plan.args
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    async with client.realtime.connect(model="vita-audio") as conn:
        while (await asyncio.wait_for(conn.recv(), WAIT_S)).type != "session.created":
            pass
        audio_input = {"format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": plan.vad(),
                       "transcription": {"model": "vita-audio"} if transcription else None}
        await conn.session.update(session={"type": "realtime", "max_output_tokens": args.answer_tokens,
                                           "audio": {"input": audio_input}})
        while (event := await asyncio.wait_for(conn.recv(), WAIT_S)).type != "session.updated":
            if event.type == "error":
                raise RuntimeError(f"session.update refused: {event.error.message}")
        mic, listener = Mic(conn, args.chunk_ms), Listener()
        tasks = [asyncio.create_task(listener.run(conn)), asyncio.create_task(mic.run())]
        try:
            turns = [await _turn(plan, mic, listener, k) for k in range(1 if warm_up else args.turns)]
            barge = None if warm_up else await _barge_in(conn, plan, mic, listener, args.turns)
            await listener.until(lambda: len(mic.pending) == 0, "end of the interruption")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return {"turns": turns, "barge_in": barge, "errors": listener.errors,
            "transcriptions": listener.transcriptions}


async def _turn(plan: Plan, mic: Mic, listener: Listener, k: int) -> dict:
    """Speak the turn; wait for its answer to end and play out; its timings."""
    start = mic.say(plan.turn.pcm)
    await listener.until(lambda: len(listener.answers) > k and listener.answers[k].done is not None, "answer")
    answer = listener.answers[k]
    if answer.first_delta is None:
        raise RuntimeError(f"realtime bench: answer {answer.id} ended ({answer.status}) without audio")
    await asyncio.sleep(max(0.0, answer.first_delta + answer.audio_s + 0.2 - time.monotonic()))  # heard it
    stopped, end_ms = listener.stopped[k]
    eos_client = mic.sent_at(start + plan.turn.last_voiced)
    eos_server = mic.sent_at(int(end_ms * RATE / 1000))
    return {"turn": k, "history": k > 0, "latency_s": answer.first_delta - eos_client,
            "latency_server_view_s": answer.first_delta - eos_server,
            "vad_stop_s": stopped - eos_client, "stopped_to_created_s": answer.created - stopped,
            "created_to_first_audio_s": answer.first_delta - answer.created,
            "audio_end_ms": end_ms, "voiced_end_ms": (start + plan.turn.last_voiced) / RATE * 1000,
            "answer_audio_s": answer.audio_s, "status": answer.status}


async def _barge_in(conn, plan: Plan, mic: Mic, listener: Listener, k: int) -> dict:
    """An unbounded answer to the turn, interrupted by speech --barge-in-after-s after its first audio."""
    await conn.session.update(session={"type": "realtime", "max_output_tokens": "inf"})
    mic.say(plan.turn.pcm)
    await listener.until(lambda: len(listener.answers) > k and listener.answers[k].first_delta is not None,
                         "audio of the answer to interrupt")
    answer = listener.answers[k]
    await asyncio.sleep(max(0.0, answer.first_delta + plan.args.barge_in_after_s - time.monotonic()))
    start = mic.say(np.concatenate([plan.interruption.pcm, _silence(0.3)]))
    await listener.until(lambda: answer.done is not None, "end of the interrupted answer")
    await conn.session.update(session={"type": "realtime", "max_output_tokens": plan.args.answer_tokens})
    await listener.until(lambda: mic.sent_at(start + plan.interruption.first_voiced) is not None, "interruption sent")
    speech = mic.sent_at(start + plan.interruption.first_voiced)
    onset = next((t for t, _ in listener.started[k + 1:] if t >= speech - 1.0), None)
    return {"status": answer.status, "reason": answer.reason,
            "reaction_s": answer.last_delta - speech,  # <= 0: no audio delta after the speech began
            "cancel_ack_s": answer.done - speech, "vad_start_s": None if onset is None else onset - speech,
            "deltas_after_done": answer.deltas_after_done, "audio_before_cancel_s": answer.audio_s}


async def _level(url: str, plan: Plan, sessions: int, rounds: int, transcription: bool = True,
                 warm_up: bool = False) -> list[dict]:
    """`sessions` clients, 1/sessions s apart, each running `rounds` sessions one after the other."""
    async def client(i: int) -> list[dict]:
        await asyncio.sleep(i / sessions)
        return [await _session(url, plan, transcription, warm_up) for _ in range(rounds)]

    done = await asyncio.gather(*(client(i) for i in range(sessions)))
    return [s for per_client in done for s in per_client]


def _collect(results: list[dict], sessions: int, turns: list, barge: list) -> None:
    for result in results:
        turns += [{"sessions": sessions, **t, "transcriptions": result["transcriptions"]} for t in result["turns"]]
        if result["barge_in"] is not None:
            barge.append({"sessions": sessions, **result["barge_in"]})
        if result["errors"]:
            raise RuntimeError(f"realtime bench: error events {result['errors'][:3]}")


def _app(args: dict):
    from serve.app import build_app

    return build_app(args)


# ---------------------------------------------------------------------------------------------------------
# In process, and the VAD alone


def _local_ttfa(pipe, plan: Plan) -> dict:
    from actors.payloads import AudioChunk, Done

    start, first, timings = time.perf_counter(), None, {}
    for event in pipe.chat(plan.committed_wav(), max_new_tokens=plan.args.answer_tokens):
        if first is None and isinstance(event, AudioChunk) and len(event.pcm):
            first = time.perf_counter() - start
        elif isinstance(event, Done):
            timings = event.timings
    if first is None:
        raise RuntimeError("realtime bench: the in-process answer had no audio")
    return {"ttfa_s": first, "encoded_s": timings.get("encoded"),
            "first_audio_codes_s": timings.get("first_audio_codes"),
            "decoder_compute_s": timings.get("first_audio_decoder_compute")}


def _vad_cost(turn: Recording, args) -> dict:
    """CPU and wall ms per 32 ms frame of the server's detector (resampling included), over the turn in pieces,
    on this process' torch threads."""
    import torch

    from actors.vad import FRAME_MS, SpeechDetector, VadParams

    detector = SpeechDetector(VadParams(0.5, args.silence_ms), RATE)
    step = RATE * args.chunk_ms // 1000
    pcm = np.concatenate([turn.pcm, _silence(1.0)])
    detector.feed(pcm[:step])  # first call
    start, wall = time.process_time(), time.perf_counter()
    for i in range(step, len(pcm), step):
        detector.feed(pcm[i:i + step])
    cpu, wall = time.process_time() - start, time.perf_counter() - wall
    frames = max(detector.frames - 1, 1)
    return {"torch_threads": torch.get_num_threads(), "cpu_ms_per_frame": cpu / frames * 1000,
            "wall_ms_per_frame": wall / frames * 1000, "frame_ms": FRAME_MS, "frames": frames,
            "cpu_share_of_one_core": cpu / frames * 1000 / FRAME_MS}


# ---------------------------------------------------------------------------------------------------------
# Summaries, report


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _summary(sessions: int, turns: list[dict], barge: list[dict], silence_ms: int) -> dict:
    window = silence_ms / 1000
    latency = [t["latency_s"] - window for t in turns]
    server = [t["latency_server_view_s"] - window for t in turns]
    reaction = [max(b["reaction_s"], 0.0) for b in barge if b["status"] == "cancelled"]  # 0: none after
    ack = [b["cancel_ack_s"] for b in barge if b["status"] == "cancelled"]
    return {"sessions": sessions, "turns": len(turns),
            "latency_minus_window_p50_s": _pct(latency, 50), "latency_minus_window_p99_s": _pct(latency, 99),
            "server_view_minus_window_p50_s": _pct(server, 50), "server_view_minus_window_p99_s": _pct(server, 99),
            "first_turn_latency_minus_window_p50_s": _pct([x for x, t in zip(latency, turns) if not t["history"]], 50),
            "vad_stop_p50_s": _pct([t["vad_stop_s"] for t in turns], 50),
            "vad_stop_p99_s": _pct([t["vad_stop_s"] for t in turns], 99),
            "created_to_first_audio_p50_s": _pct([t["created_to_first_audio_s"] for t in turns], 50),
            "barge_ins": len(barge), "cancelled": len(reaction),
            "barge_in_reaction_p50_s": _pct(reaction, 50), "barge_in_reaction_p99_s": _pct(reaction, 99),
            "no_delta_after_speech": sum(b["reaction_s"] <= 0 for b in barge if b["status"] == "cancelled"),
            "cancel_ack_p50_s": _pct(ack, 50), "cancel_ack_p99_s": _pct(ack, 99),
            "deltas_after_cancel": sum(b["deltas_after_done"] for b in barge)}


def _target(turns: list[dict], local: list[dict], silence_ms: int) -> dict:
    first = [t["latency_s"] for t in turns if t["sessions"] == 1 and not t["history"]]
    ttfa = statistics.median(x["ttfa_s"] for x in local)
    latency = statistics.median(first)
    window = silence_ms / 1000
    bound = TARGET * ttfa + window
    return {"latency_p50_s": latency, "in_process_ttfa_p50_s": ttfa, "silence_window_s": window,
            "bound_s": bound, "ratio_minus_window": (latency - window) / ttfa, "met": latency <= bound,
            "turns": len(first), "in_process_requests": len(local)}


def _breakdown(turns: list[dict], quiet: list[dict], local: list[dict], silence_ms: int) -> list[dict]:
    """Medians of the 1-session first turns' split, with and without input transcription, and in process."""
    rows = []
    for name, chosen in (("realtime, transcription on", turns), ("realtime, transcription off", quiet)):
        first = [t for t in chosen if t["sessions"] == 1 and not t["history"]]
        if first:
            med = {k: statistics.median(t[k] for t in first) for k in
                   ("vad_stop_s", "stopped_to_created_s", "created_to_first_audio_s", "latency_s")}
            rows.append({"path": name, "turns": len(first), "silence_window_s": silence_ms / 1000,
                         "vad_stop_s": med["vad_stop_s"], "stopped_to_created_s": med["stopped_to_created_s"],
                         "created_to_first_audio_s": med["created_to_first_audio_s"],
                         "end_of_speech_to_first_audio_s": med["latency_s"]})
    if local:
        med = {k: statistics.median(x[k] for x in local if x[k] is not None) for k in
               ("encoded_s", "first_audio_codes_s", "decoder_compute_s", "ttfa_s")}
        rows.append({"path": "in process (request start = 0)", "turns": len(local), "encoded_s": med["encoded_s"],
                     "first_audio_codes_s": med["first_audio_codes_s"], "decoder_compute_s": med["decoder_compute_s"],
                     "created_to_first_audio_s": med["ttfa_s"]})
    return rows


def _markdown(results: dict, load) -> str:
    t, p = results["target"], results["protocol"]
    verdict = "met" if t["met"] else "missed"
    columns = ["path", "turns", "silence_window_s", "vad_stop_s", "stopped_to_created_s", "encoded_s",
               "first_audio_codes_s", "decoder_compute_s", "created_to_first_audio_s", "end_of_speech_to_first_audio_s"]
    one, dflt = results["vad"]["one_thread"], results["vad"]["default_threads"]
    return (
        f"Hands-free `/v1/realtime` through the openai SDK client, server VAD (silence_duration_ms "
        f"{p['server_vad']['silence_duration_ms']}, prefix_padding_ms {p['server_vad']['prefix_padding_ms']}), "
        f"input transcription on, the microphone paced in {p['chunk_ms']} ms pieces; turn: mini-speech "
        f"`{p['turn']}` ({p['turn_s']:.2f} s), {p['answer_tokens']} answer tokens; interruption `{p['interruption']}`. "
        "Protocol and definitions: the docstring of `benchmarks/realtime.py`.\n\n"
        "End of user speech (client view) = the piece holding the turn's last voiced sample was sent "
        f"({p['voiced']}); server view = the piece holding the sample at `speech_stopped.audio_end_ms`. "
        "Latency = end of speech -> first `response.output_audio.delta`, shown minus the silence window.\n\n"
        "## Latency and barge-in per concurrent sessions\n\n" + markdown_table(results["levels"]) +
        f"\n## Target at 1 session: {verdict}\n\n"
        f"End of speech -> first audio {t['latency_p50_s']:.3f} s (median of {t['turns']} first turns) against "
        f"1.2 x in-process TTFA {t['in_process_ttfa_p50_s']:.3f} s + window {t['silence_window_s']:.3f} s = "
        f"{t['bound_s']:.3f} s; minus the window it is {t['ratio_minus_window']:.2f}x the in-process TTFA.\n\n"
        "## Where the time goes (1 session, first turns, medians)\n\n" + markdown_table(results["breakdown"], columns) +
        "\nvad_stop: end of speech -> `speech_stopped` received (the silence window, Silero's hysteresis, a "
        "piece's length); stopped_to_created: commit and plan; created_to_first_audio: admission, encoder, LLM, "
        "decoder, Serve's hops and any queueing (in process: request start -> first PCM, with its own "
        "encoded / first audio codes / decoder compute marks).\n\n" + _findings(results) +
        "Server VAD cost (actors.vad.SpeechDetector in this process, resampling included): "
        f"{one['cpu_ms_per_frame']:.2f} ms CPU ({one['wall_ms_per_frame']:.2f} ms wall) per {one['frame_ms']:.0f} ms "
        f"frame on one torch thread ({100 * one['cpu_share_of_one_core']:.1f} % of a core per session; the ingress "
        "replica is a num_cpus=0 Ray actor, for which Ray sets OMP_NUM_THREADS=1); on torch's default "
        f"{dflt['torch_threads']} threads {dflt['cpu_ms_per_frame']:.2f} ms CPU ({dflt['wall_ms_per_frame']:.2f} ms "
        "wall): a detector must run on one thread.\n\n"
        f"Load average during the run: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} ({os.cpu_count()} cores, "
        "shared machine).\n\n![realtime](realtime.png)\n")


def _findings(results: dict) -> str:
    """The split above in words: what each part adds over the in-process TTFA, and the VAD's lag per level."""
    rows = {r["path"]: r for r in results["breakdown"]}
    on, off = rows.get("realtime, transcription on"), rows.get("realtime, transcription off")
    local = rows.get("in process (request start = 0)")
    lines = []
    if on and local:
        lines.append(f"- VAD: end of speech -> `speech_stopped` {on['vad_stop_s']:.3f} s, of which "
                     f"{on['silence_window_s']:.3f} s is the silence window.")
    if on and off and local:
        lines.append(f"- Input transcription beside the answer: `response.created` -> first audio "
                     f"{on['created_to_first_audio_s']:.3f} s with it, {off['created_to_first_audio_s']:.3f} s without "
                     f"({on['created_to_first_audio_s'] - off['created_to_first_audio_s']:+.3f} s).")
        lines.append(f"- Without it, {off['created_to_first_audio_s'] - local['created_to_first_audio_s']:.3f} s above "
                     f"the in-process TTFA ({local['created_to_first_audio_s']:.3f} s, of which decoder compute "
                     f"{local['decoder_compute_s']:.3f} s): Ray's stage hops, the Serve proxy and ingress, the "
                     "WebSocket and the SDK client, and whatever waited for a core.")
    lag = ", ".join(f"{r['sessions']} sessions {r['vad_stop_p50_s']:.2f} / {r['vad_stop_p99_s']:.2f} s"
                    for r in results["levels"])
    lines.append(f"- End of speech -> `speech_stopped` (p50 / p99) per level: {lag}. The server's `audio_end_ms` stays "
                 "where the speech ended (server view = client view), so what is above the window is waiting: for "
                 "the ingress' VAD and event loop, Serve's proxy, or this client (one process for all sessions); "
                 "not split further.")
    gaps = [b["cancel_ack_s"] - b["vad_start_s"] for b in results["barge_in"]
            if b["status"] == "cancelled" and b["vad_start_s"] is not None]
    if gaps:
        lines.append(f"- Barge-in: the cancelled answer's `response.done` came {statistics.median(gaps) * 1000:.0f} ms "
                     f"(median, max {max(gaps) * 1000:.0f} ms) after the `speech_started` that cancelled it; the rest "
                     "of the reaction is the time to that `speech_started`.")
    return "\n".join(lines) + "\n\n"


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, target = results["levels"], results["target"]
    sessions = [r["sessions"] for r in rows]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 4))
    for key, label in (("latency_minus_window_p50_s", "p50"), ("latency_minus_window_p99_s", "p99"),
                       ("server_view_minus_window_p50_s", "p50, server's end of speech")):
        left.plot(sessions, [r[key] for r in rows], marker="o", label=label)
    left.axhline(target["in_process_ttfa_p50_s"], color="C2", linestyle=":", label="in-process TTFA")
    left.axhline(TARGET * target["in_process_ttfa_p50_s"], color="gray", linestyle="--", label="1.2x in-process")
    left.set(xlabel="concurrent sessions", ylabel="seconds", title="end of speech -> first audio, minus window")
    for key, label in (("barge_in_reaction_p50_s", "p50"), ("barge_in_reaction_p99_s", "p99"),
                       ("cancel_ack_p50_s", "response.done p50")):
        middle.plot(sessions, [r[key] if r[key] is not None else np.nan for r in rows], marker="o", label=label)
    middle.set(xlabel="concurrent sessions", ylabel="seconds", title="barge-in: speech start -> last audio delta")
    parts = ("vad_stop_s", "stopped_to_created_s", "created_to_first_audio_s")
    names = [r["path"].replace(", ", "\n") for r in results["breakdown"]]
    bottom = np.zeros(len(names))
    for part in parts:
        values = np.array([r.get(part) or 0.0 for r in results["breakdown"]])
        right.bar(names, values, bottom=bottom, label=part.removesuffix("_s"))
        bottom += values
    right.set(ylabel="seconds", title="1 session: where the time goes (medians)")
    right.tick_params(axis="x", labelsize=7)
    for ax in (left, middle, right):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
