"""The labeling app: a FastAPI ingress on Ray Serve in front of the labeler actor.

    GET  /                 the page (token in the URL: ?token=...)
    GET  /api/next         200 {query_id, kind, instruction, left, right, prompt?, responses?}; 204 if none
    POST /api/label        {query_id, choice} or {query_id, order}: 200 once durable
    GET  /api/status       which run's page this is (app); counts: pending, leased, answered by source
    GET  /clips/<id>.webm  a rendered clip

Every route needs the access token (header `Authorization: Bearer <token>` or `X-Token`, or
`?token=` for the page and the clips a <video> element loads); it is compared in constant
time. The labeler actor is the only writer of the store: the app holds no state of its own, so
any number of replicas can serve the page.
"""


import hmac
import json
import re
import secrets
from importlib import resources
from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from rlhf_ray.runtime.actors import actor_options
from rlhf_ray.runtime.sections import RoleResources
from rlhf_ray.storage.store import PreferenceStore

MAX_BODY = 64 * 1024
LABELER_ID = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")  # who answered, as the store records it
DEPLOYMENT_NAME = "LabelingApp"

api = FastAPI(title="rlhf-ray labeling", docs_url=None, redoc_url=None, openapi_url=None)


class LabelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query_id: str = Field(min_length=1, max_length=128)
    choice: Literal["left", "right", "equal", "skip"] | None = None
    order: list[int] | None = Field(None, min_length=2, max_length=9)
    labeler: str | None = Field(None, pattern=LABELER_ID.pattern)


def new_token() -> str:
    return secrets.token_urlsafe(24)


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


# Every handler is async and only awaits the labeler actor, so one replica holds many
# requests at once. At Serve's default (5 ongoing) 50 labelers queued in the proxy, whose
# retries with backoff cut throughput to a quarter of one labeler's (measured: 6 vs 26
# labels/s, benchmarks/labeling_load.py).
MAX_ONGOING_REQUESTS = 128


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=MAX_ONGOING_REQUESTS)
@serve.ingress(api)
class LabelingApp:
    def __init__(self, labeler_name: str, namespace: str, store_root: str, token: str,
                 instruction: str = "", app_id: str = ""):
        import ray

        if not token:
            raise ValueError("the labeling app needs an access token")
        self.labeler = ray.get_actor(labeler_name, namespace=namespace)
        self.store = PreferenceStore(store_root)
        self._token = token.encode()
        self.instruction = instruction  # what the task asks people to judge
        self.app_id = app_id  # which run's page this is (`/api/status` says it)
        self.page = resources.files("rlhf_ray.feedback").joinpath("static/index.html").read_text()

    # ------------------------------------------------------------------ helpers
    def _authorized(self, request: Request) -> bool:
        given = request.headers.get("x-token") or ""
        auth = request.headers.get("authorization") or ""
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given:
            given = request.query_params.get("token") or ""
        return hmac.compare_digest(given.encode(), self._token)

    @staticmethod
    def _labeler_id(value: str | None) -> str:
        value = value or "anonymous"
        if not LABELER_ID.match(value):
            raise HTTPException(422, f"labeler {value[:80]!r}: 1-64 letters, digits or _.@-")
        return value

    # ------------------------------------------------------------------ routes
    @api.get("/")
    async def page(self, request: Request):
        if not self._authorized(request):
            return HTMLResponse("<h1>401: open the URL printed at start (it carries the token)</h1>",
                                status_code=401)
        return HTMLResponse(self.page, headers={"Cache-Control": "no-store"})

    @api.get("/api/next")
    async def next(self, request: Request, labeler: str | None = None, exclude: str = ""):
        if not self._authorized(request):
            return _error(401, "missing or wrong token")
        who = self._labeler_id(labeler)
        skip = [q for q in exclude.split(",") if q][:16]
        q = await self.labeler.lease_next.remote(who, skip)
        if q is None:
            return Response(status_code=204)
        # what the query kind shows: two clips, two responses, or K responses to rank
        view = {k: v for k, v in q.items() if k not in ("query_id", "kind", "item_ids")}
        return {"query_id": q["query_id"], "kind": q["kind"], "instruction": self.instruction,
                **view}

    @api.post("/api/label")
    async def label(self, request: Request):
        if not self._authorized(request):
            return _error(401, "missing or wrong token")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
            return _error(413, f"body of {declared} bytes: at most {MAX_BODY}")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return _error(413, f"body over {MAX_BODY} bytes")
        try:
            msg = LabelBody.model_validate(json.loads(body or b"null"))
        except (ValueError, ValidationError) as exc:
            first = exc.errors()[0] if isinstance(exc, ValidationError) else None
            where = ".".join(map(str, first["loc"])) if first and first["loc"] else "body"
            why = first["msg"] if first else "not JSON"
            return _error(422, f"{where}: {why}")
        if (msg.choice is None) == (msg.order is None):
            return _error(422, "give exactly one of `choice` or `order`")
        source = f"human:{self._labeler_id(msg.labeler)}"
        try:
            answer = msg.order if msg.order is not None else msg.choice
            status = await self.labeler.answer.remote(msg.query_id, answer, source)
        except Exception as exc:  # a ValueError raised inside the actor arrives wrapped
            cause = getattr(exc, "cause", None) or exc
            if isinstance(cause, ValueError):
                return _error(422, str(cause).splitlines()[0])
            raise
        if status == "unknown":
            return _error(404, f"query {msg.query_id}: unknown")
        if status == "conflict":
            return _error(409, f"query {msg.query_id}: already answered differently")
        return {"status": status, "query_id": msg.query_id}

    @api.get("/api/status")
    async def status(self, request: Request):
        if not self._authorized(request):
            return _error(401, "missing or wrong token")
        s = await self.labeler.stats.remote()
        return {"app": self.app_id, "pending": s["labels_pending"], "leased": s["labels_leased"],
                "ready": s["labels_ready"], "answered": s["labels_total"],
                "answered_by_source": s["labels_by_source"], "budget": s["budget"]}

    @api.get("/clips/{name}")
    async def clip(self, request: Request, name: str):
        if not self._authorized(request):
            return _error(401, "missing or wrong token")
        sid, _, ext = name.rpartition(".")
        if ext != "webm" or not sid.replace("-", "").isalnum():
            return _error(404, f"clip {name[:80]}: unknown")
        data = self.store.read_clip(sid)
        if data is None:
            return _error(404, f"clip {name[:80]}: not rendered")
        return Response(data, media_type="video/webm",
                        headers={"Cache-Control": "private, max-age=86400"})


def deploy(*, labeler_name: str, namespace: str, store_root: str, token: str, app_name: str,
           route_prefix: str = "/label", num_replicas: int = 1, res=None, instruction: str = ""):
    """Start the labeling app (non-blocking); `res`: `placement.labeling_app`."""

    app = LabelingApp.options(num_replicas=num_replicas,
                              ray_actor_options=actor_options(res or RoleResources())).bind(
        labeler_name, namespace, store_root, token, instruction, app_name)
    return serve.run(app, name=app_name, route_prefix=route_prefix, blocking=False)
