"""The typed application builder: `serve run serve.app:build_app models=DIR`, serve/config.yaml (`serve run
serve/config.yaml`, the RayService's serveConfigV2) and `vita-audio serve` all start this same app: three
stage deployments + the ingress holding their handles.
"""
from __future__ import annotations


import dataclasses
import math

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actors.config import STAGES, PipelineConfig
from serve.hygiene import ConnectionLimits
from serve.deployments import IngressReplicas, IngressScaling, QueueCap, StageScaling, ingress_options, stage_application


class Args(BaseModel):
    """Arguments of the app (`key=value` on `serve run`, `args:` in the Serve config)."""

    model_config = ConfigDict(extra="forbid")

    models: str | None = None  # folder with llm/, encoder/, decoder/; None: $VITA_AUDIO_MODELS, else the tiny set
    api_key: str | None = None
    api_keys_file: str | None = None  # more keys, revocations (serve.keys); also $VITA_AUDIO_API_KEYS(_FILE)
    # the state store (serve.state): a folder or sqlite:///folder (embedded, one machine), redis://host:port/db
    # (clusters), memory (one process); None: $VITA_AUDIO_STATE, else $VITA_AUDIO_CACHE/state
    state: str | None = None
    # the batch API (serve.routes_batch): where files and batch run folders live (None: $VITA_AUDIO_CACHE/files; on
    # a cluster a store every node running a batch driver reaches: s3://bucket/prefix or any URL jobs.storage knows,
    # its credentials in the nodes' environment or env_vars), URL prefixes a batch line may read audio from
    # (s3://bucket/...), lines per result block (the unit of resume and cancel) and the job's pool of request runners
    files: str | None = None
    batch_url_prefixes: list[str] = []
    batch_block_size: int = Field(16, ge=1)
    batch_runners: int = Field(1, ge=1)
    batch_runner_gpus: float = Field(0.0, ge=0)  # per runner (it holds all three stages; on a GPU node: e.g. 1)
    max_body_bytes: int = Field(8 * 2**20, ge=1)
    max_audio_seconds: float = Field(60.0, gt=0)
    max_text_chars: int = Field(4096, ge=1)
    max_tokens: int = Field(2048, ge=1)
    # /v1/realtime sessions (serve.routes_realtime): how long a dropped socket's session waits for a resume, the
    # longest session, and the sessions (open or resumable) one key may hold at once
    realtime_resume_grace_s: float = Field(30.0, ge=0)
    realtime_max_session_s: float = Field(3600.0, gt=0)
    realtime_sessions_per_key: int = Field(16, ge=1)
    # the request limits of every front end (actors.orchestration.Limits, from PipelineConfig: same defaults)
    request_timeout_s: float = Field(PipelineConfig.request_timeout_s, gt=0)
    stage_timeout_s: float = Field(PipelineConfig.stage_timeout_s, gt=0)
    max_inflight_chunks: int = Field(PipelineConfig.max_inflight_chunks, ge=1)
    torch_threads: int | None = 1
    # the ingress: requests it runs at once per replica, and how many wait at the proxy beyond that before the
    # proxy answers 503 with Retry-After (in OpenAI's error JSON: serve.proxy_errors). Keep it above the stages'
    # caps (their max_ongoing + max_queued): requests beyond a stage's capacity are then refused by the ingress,
    # at once, as 503 in OpenAI's error shape with Retry-After; this is the last guard against piling up
    max_concurrent_requests: int = Field(256, ge=1)
    max_waiting_requests: QueueCap = 64
    retry_after_s: float = Field(1.0, ge=0)
    # connection hygiene (serve.hygiene): a body must arrive whole within body_timeout_s (else 408); a realtime
    # socket must send its first event within ws_first_event_timeout_s and is closed after ws_idle_timeout_s with
    # nothing sent either way; one client (API key owner, else address) holds at most max_connections_per_client
    # requests and sockets per ingress replica (beyond: 429); Host must be loopback, an IP literal or listed in
    # allowed_hosts (else 421) and a browser's Origin this server, a loopback page or listed in allowed_origins
    # (else 403); "*" in a list allows any
    body_timeout_s: float = Field(60.0, gt=0)
    ws_first_event_timeout_s: float = Field(30.0, gt=0)
    ws_idle_timeout_s: float = Field(600.0, gt=0)
    max_connections_per_client: int = Field(64, ge=1)
    allowed_hosts: list[str] = []
    allowed_origins: list[str] = []
    env_vars: dict[str, str] = {}  # set in every replica of the app (e.g. Serve's metric push intervals)
    encoder: StageScaling = Field(default_factory=StageScaling)
    llm: StageScaling = Field(default_factory=StageScaling)
    decoder: StageScaling = Field(default_factory=StageScaling)
    ingress: IngressReplicas = Field(default_factory=IngressReplicas)

    @field_validator("files")
    @classmethod
    def _files_store_known(cls, value: str | None) -> str | None:
        """An unknown scheme is refused when the app is built, by name (not at the first upload)."""
        if value is not None:
            from jobs.storage import location

            location(value, "files")
        return value

    @model_validator(mode="after")
    def _decoder_holds_llm_chunks(self) -> "Args":
        self.decoder = decoder_capacity(self.decoder, self.llm, self.max_inflight_chunks)
        return self

    def caps(self) -> dict:
        return {"max_body_bytes": self.max_body_bytes, "max_audio_seconds": self.max_audio_seconds,
                "max_text_chars": self.max_text_chars, "max_tokens": self.max_tokens,
                "realtime_resume_grace_s": self.realtime_resume_grace_s,
                "realtime_max_session_s": self.realtime_max_session_s,
                "realtime_sessions_per_key": self.realtime_sessions_per_key,
                "connections": ConnectionLimits(
                    body_timeout_s=self.body_timeout_s, ws_first_event_timeout_s=self.ws_first_event_timeout_s,
                    ws_idle_timeout_s=self.ws_idle_timeout_s, max_connections_per_client=self.max_connections_per_client,
                    allowed_hosts=tuple(self.allowed_hosts), allowed_origins=tuple(self.allowed_origins))}

    def stage_scaling(self, stage: str) -> StageScaling:
        return dataclasses.replace(getattr(self, stage), env_vars={**getattr(self, stage).env_vars, **self.env_vars})

    def ingress_scaling(self) -> IngressScaling:
        return IngressScaling(max_ongoing_requests=self.max_concurrent_requests,
                              max_queued_requests=self.max_waiting_requests, retry_after_s=self.retry_after_s,
                              env_vars=dict(self.env_vars), replicas=self.ingress)

    def batch_settings(self) -> dict:
        """What the batch API's routes and driver need (serve.routes_batch)."""
        from serve.files import default_files_dir

        return {"files": self.files or default_files_dir(), "models": self.models_dir(),
                "url_prefixes": list(self.batch_url_prefixes), "block_size": self.batch_block_size,
                "pool": {"size": self.batch_runners, "num_gpus": self.batch_runner_gpus}}

    def state_url(self) -> str:
        """The state store every ingress replica opens (resolved once, here: all replicas get the same one)."""
        from serve.state import default_state

        return self.state or default_state()

    def pipeline_config(self) -> PipelineConfig:
        """The stages' config: the models folder, the request limits; stages on CPU unless scaled onto GPUs."""
        return PipelineConfig.from_models_dir(
            self.models_dir(), request_timeout_s=self.request_timeout_s, stage_timeout_s=self.stage_timeout_s,
            max_inflight_chunks=self.max_inflight_chunks,
        ).with_resources(num_gpus=0.0, torch_threads=self.torch_threads)

    def models_dir(self) -> str:
        if self.models:
            return self.models
        from pipeline.tiny import default_models_dir

        return str(default_models_dir())


def decoder_capacity(decoder: StageScaling, llm: StageScaling, max_inflight_chunks: int) -> StageScaling:
    """The decoder's caps, derived from the LLM's: raised (never lowered) until the decoder holds every LLM slot's
    chunks in flight, `llm.max_ongoing_requests x llm.max_replicas` streams with `max_inflight_chunks` each. At the
    decoder's max_replicas all of them run (max_ongoing_requests); at its fewest replicas the rest wait in its queue
    (max_queued_requests; -1 stays no cap). Raising rather than refusing: a bigger decoder cap costs nothing (the
    chunks wait in its micro-batcher instead of the caller's queue) and plans written for other stage sizes still
    load. (Chunks beyond the caps would only wait: `actors.orchestration.ChunkGate` resends a refused chunk.)"""
    chunks = llm.max_ongoing_requests * llm.max_replicas * max_inflight_chunks
    ongoing = max(decoder.max_ongoing_requests, math.ceil(chunks / decoder.max_replicas))
    queued = decoder.max_queued_requests
    if queued != -1:
        queued = max(queued, chunks - ongoing * max(decoder.min_replicas, 1))
    return dataclasses.replace(decoder, max_ongoing_requests=ongoing, max_queued_requests=queued)


def build_app(args: Args | dict):
    """The bound Serve application (stage deployments built from the plain stage classes)."""
    from ray import serve

    from actors.orchestration import Limits
    from serve.ingress import Ingress

    args = args if isinstance(args, Args) else Args.model_validate(args)
    config = args.pipeline_config()
    handles = {s: stage_application(s, config, args.stage_scaling(s)) for s in STAGES}
    ingress = serve.deployment(Ingress).options(**ingress_options(args.ingress_scaling()))
    return ingress.bind(handles["encoder"], handles["llm"], handles["decoder"], args.caps(), args.api_key,
                        Limits.of(config), config.llm.path, api_keys_file=args.api_keys_file, state=args.state_url(),
                        batch=args.batch_settings())
