"""`/health` outside the ingress' request slots: its own small Serve application (route prefix /health, its own
replica), so idle sockets and slow bodies filling the ingress never starve the readiness probe.

Serve's proxy counts every request against the ingress replica's `max_ongoing_requests` before the replica sees
it, so a /health route on the ingress waits in the same queue as the work. This application answers the same
check from its own replica: each stage answers `check_health` (a stage with no live replica is down), and the
controller reports the app's ingress deployment healthy (Serve's own replica health checks, which use no request
slot). Readiness: this /health (200 ok / 503 unavailable + Retry-After). Liveness: the proxy's `/-/healthz`.

    applications:                      # serve/config.yaml: beside the app
      - {name: vita-health, route_prefix: /health, import_path: serve.health:build_health, args: {app: vita}}
"""
from __future__ import annotations

import asyncio

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve

from actors.config import STAGES
from serve.deployments import ServeStageClients

IMPORT_PATH = "serve.health:build_health"
APP_NAME, ROUTE_PREFIX = "vita-health", "/health"
RETRY_AFTER_S = "1"
health_app = FastAPI(title="VITA-Audio health")


class _PrefixIsRoot:
    """ASGI middleware: the prefix itself (/health) is the app's root route "/", not a redirect to /health/."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        root = scope.get("root_path", "").rstrip("/")
        if scope["type"] == "http" and scope.get("path", "").rstrip("/") == root:
            scope = {**scope, "path": root + "/", "raw_path": (root + "/").encode()}
        await self.app(scope, receive, send)


health_app.add_middleware(_PrefixIsRoot)


def health_response(states: dict[str, str]) -> JSONResponse:
    """The health JSON (also the ingress' own /health): 200 when every part is ok, else 503 + Retry-After."""
    ok = all(v == "ok" for v in states.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "stages": states}, status_code=200 if ok else 503,
                        headers=None if ok else {"Retry-After": RETRY_AFTER_S})


@serve.deployment(name="vita-health", num_replicas=1, max_ongoing_requests=32, max_queued_requests=64,
                  ray_actor_options={"num_cpus": 0})
@serve.ingress(health_app)
class Health:
    """The stages of application `app` (by deployment name) and its ingress' state from the controller."""

    def __init__(self, app: str = "vita"):
        self.app_name = app
        self.clients: ServeStageClients | None = None

    @health_app.get("/")
    async def health(self):
        if self.clients is None:
            try:
                self.clients = ServeStageClients(*(serve.get_deployment_handle(f"vita-{s}", app_name=self.app_name)
                                                   for s in STAGES))
            except Exception as err:  # the app is not deployed (yet)
                return health_response({s: f"down: {type(err).__name__}" for s in (*STAGES, "ingress")})
        states = await self.clients.check_health()
        states["ingress"] = await asyncio.to_thread(self._ingress_state)  # a blocking controller call
        return health_response(states)

    def _ingress_state(self) -> str:
        try:
            app = serve.status().applications.get(self.app_name)
            deployment = app.deployments.get("vita-ingress") if app else None
        except Exception as err:
            return f"down: {type(err).__name__}"
        if deployment is None:
            return f"down: application {self.app_name!r} has no ingress"
        status = str(getattr(deployment.status, "value", deployment.status))
        return "ok" if status in ("HEALTHY", "UPSCALING", "DOWNSCALING") else f"down: {status.lower()}"


def build_health(args: dict | None = None):
    """The bound health application (`args`: {app: the speech app's name, default "vita"})."""
    args = dict(args or {})
    unknown = set(args) - {"app"}
    if unknown:
        raise ValueError(f"serve.health: unknown args {sorted(unknown)} (only `app`)")
    return Health.bind(args.get("app", "vita"))
