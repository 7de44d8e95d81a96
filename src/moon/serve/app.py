"""The HTTP routes of `moon serve` (FastAPI): request and response models, errors, headers, metrics.

Every handler reads the service's current state once (`pinned`) and answers from that object
alone; the version it names goes into the body (`version`) and the `x-moon-version` header.
Every refusal is JSON, `{"error": "...", "version": "..."}`, with a 4xx status that says what
kind of mistake it is: 400 malformed JSON, 401 admin key, 404 unknown item, version or route,
409 a conflict with the served state, 413 over a limit, 422 a value that cannot be used, 429
the embedding queue is full. The OpenAPI page is at /docs.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException

from moon import __version__
from moon.errors import UserError
from moon.model.inputs import Input
from moon.serve.limits import RequestError, check_count, check_text, model_input, photo
from moon.serve.service import SearchQuery, Service
from moon.serve.state import ServingState, self_test

VERSION_HEADER = "x-moon-version"

# ---------------------------------------------------------------- request and response models


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbedInput(Strict):
    text: str | None = Field(None, description="a text query, or an item's text shown beside its image",
                             examples=["red summer dress"])
    image: str | None = Field(None, description="an image as base64 (or a data:image/...;base64, URI): a shopper's "
                              "photo, or an item's image shown beside its text")


class EmbedRequest(Strict):
    inputs: list[EmbedInput] = Field(description="what to embed, in order: each a text, an image, or both (as the "
                                     "model shows an item); at most serve.max_inputs")
    dim: int | None = Field(None, description="a Matryoshka dimension of the model (default: its full width)")


class EmbedResponse(BaseModel):
    version: str = Field(description="the store version served when the request was answered")
    model: str = Field(description="the serving model")
    dim: int = Field(description="the width of every vector")
    vectors: list[list[float]] = Field(description="one unit-length vector per input, in the inputs' order")


class SearchRequest(Strict):
    text: str | None = Field(None, description="a text query, encoded by the serving model")
    image: str | None = Field(None, description="a photo as base64 (or a data: URI), encoded by the serving model")
    vector: list[float] | None = Field(None, description="a query vector; a longer one is cut to its Matryoshka prefix")
    item_id: str | None = Field(None, description="an item of the version: its stored vector is the query, and the "
                                "item itself is left out of the results")
    k: int = Field(10, description="how many results (at most serve.max_k)")
    dim: int | None = Field(None, description="a dimension of the version to search at (default: its full width)")
    category: str | None = Field(None, description="only items with this category at any level of their category "
                                 "path (the leaf or any ancestor); with --engine milvus, the leaf")


class SearchHit(BaseModel):
    item_id: str = Field(description="a catalogue item")
    score: float = Field(description="its cosine similarity to the query")


class SearchResponse(BaseModel):
    version: str = Field(description="the store version that answered")
    dim: int = Field(description="the dimension searched")
    hits: list[SearchHit] = Field(description="the best items, best first")


class VectorResponse(BaseModel):
    version: str = Field(description="the store version that answered")
    item_id: str
    dim: int
    vector: list[float] = Field(description="the item's stored vector at dim (a Matryoshka prefix, re-normalised)")


class LookupRequest(Strict):
    ids: list[str] = Field(description="item ids to look up, at most serve.max_lookup_ids")
    dim: int | None = Field(None, description="a dimension of the version (default: its full width)")


class LookupResponse(BaseModel):
    version: str = Field(description="the store version that answered")
    dim: int
    found: list[str] = Field(description="the ids the version holds, in the order asked")
    missing: list[str] = Field(description="the ids it does not hold")
    vectors: list[list[float]] = Field(description="the stored vector of each found id, in the order of found")


class VersionInfo(BaseModel):
    name: str
    model: str | None = Field(description="the model that made it")
    items: int
    dim: int
    dims: list[int] = Field(description="the dimensions it can be searched at")
    created_at: str | None
    updated_at: str | None = Field(description="when items were last added to it")
    made_by_serving_model: bool = Field(description="whether text, image and new items can be used with it")
    active: bool = Field(description="whether it is being served")


class VersionsResponse(BaseModel):
    version: str = Field(description="the store version being served")
    model: str = Field(description="the serving model")
    engine: str = Field(description="where searches go: faiss (the version's own indexes) or milvus")
    base_items: int = Field(description="items in the served version's index")
    delta_items: int = Field(description="items searched beside it: added after the index was built, or just now")
    versions: list[VersionInfo] = Field(description="every finished version of the run's store, oldest first")


class Health(BaseModel):
    status: str
    version: str | None


class ReloadRequest(Strict):
    version: str | None = Field(None, description="the store version to serve (default: the newest finished "
                                "version made by the serving model)")


class ReloadResponse(BaseModel):
    version: str = Field(description="the version now served")
    previous: str = Field(description="the version served before")
    seconds: float = Field(description="time to load and self-test it")
    items: int
    base_items: int
    delta_items: int


class NewItem(Strict):
    item_id: str = Field(description="a new, unique item id")
    title: str
    category: list[str] = Field(description="the category path, root to leaf")
    image: str = Field(description="the main image, base64 (or a data: URI)")
    attributes: dict[str, str] = Field({}, description="attribute name -> value")
    spu_id: str | None = Field(None, description="the product its SKU variants share (default: the item id)")
    shop_id: str | None = None
    price: float | None = None
    created_at: dt.datetime | None = Field(None, description="the listing time (default: now)")


class ItemsRequest(Strict):
    items: list[NewItem] = Field(description="items to add, at most serve.max_inputs")


class ItemsResponse(BaseModel):
    version: str = Field(description="the store version they joined")
    added: list[str]
    items: int = Field(description="items the version now holds")
    delta_items: int


class ErrorResponse(BaseModel):
    error: str = Field(description="what is wrong and what to change")
    version: str | None = Field(description="the store version served when the request was refused")


ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 409, 413, 422, 429)}
ADMIN_ERRORS = {status: {"model": ErrorResponse} for status in (401, 404, 409, 413, 422)}

# ---------------------------------------------------------------- the app


def create_app(service: Service, key: str | None, admin: bool = True) -> FastAPI:
    """The FastAPI app over `service`; admin routes behind bearer `key` (None: open, loopback only)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(title="MOON serving", version=__version__, lifespan=lifespan,
                  description="Embed texts and photos with a trained MOON model, search a representation store "
                  "version, look up stored item vectors, and switch versions without downtime. Every response "
                  f"names the store version that answered (`version`, and the `{VERSION_HEADER}` header).")
    app.state.service = service
    app.state.key = key
    app.add_middleware(Guard, service=service)
    add_error_handlers(app, service)
    add_routes(app, service)
    if admin:
        add_admin_routes(app, service)
    return app


def pinned(request: Request) -> ServingState:
    """The state this request is answered from: read once; its version goes into the header."""
    state = request.app.state.service.state
    request.state.moon_version = state.version
    return state


Pinned = Annotated[ServingState, Depends(pinned)]


def add_routes(app: FastAPI, service: Service) -> None:
    limits = service.limits

    @app.post("/v1/embed", response_model=EmbedResponse, responses=ERRORS, tags=["embed"])
    def embed(body: EmbedRequest, state: Pinned):
        """Vectors of texts, photos, or text+image inputs, made by the serving model (micro-batched)."""
        check_count(len(body.inputs), limits.max_inputs, "inputs", "max_inputs")
        dim = service.model.check_dim(body.dim)
        inputs = [model_input(one.text, one.image, limits, f"input {i}") for i, one in enumerate(body.inputs)]
        vectors = service.embed(inputs, dim)
        return EmbedResponse(version=state.version, model=service.model.label, dim=dim, vectors=vectors.tolist())

    @app.post("/v1/search", response_model=SearchResponse, responses=ERRORS, tags=["search"])
    def search(request: Request, body: SearchRequest, state: Pinned):
        """The k items nearest to a text, a photo, a vector or an item, optionally within a category."""
        version, dim, hits = service.search(state, search_query(body, service), body.k, body.dim, body.category)
        request.state.moon_version = version  # another engine answers from a version of its own
        return SearchResponse(version=version, dim=dim,
                              hits=[SearchHit(item_id=hit.item_id, score=hit.score) for hit in hits])

    @app.get("/v1/items/{item_id}/vector", response_model=VectorResponse, responses=ERRORS, tags=["lookup"])
    def item_vector(item_id: Annotated[str, Path(description="an item of the version")], state: Pinned,
                    dim: Annotated[int | None, Query(description="a dimension of the version (default: its full "
                                                     "width)")] = None):
        """One item's stored vector."""
        dim, found, _, vectors = service.lookup(state, [item_id], dim)
        if not found:
            raise RequestError(404, f"item {item_id!r} is not in store version {state.version} ({state.count:,} items)")
        return VectorResponse(version=state.version, item_id=item_id, dim=dim, vector=vectors[0].tolist())

    @app.post("/v1/lookup", response_model=LookupResponse, responses=ERRORS, tags=["lookup"])
    def lookup(body: LookupRequest, state: Pinned):
        """Stored vectors of many items at once (the CPU lookup a CTR server makes); unknown ids are listed."""
        check_count(len(body.ids), limits.max_lookup_ids, "ids", "max_lookup_ids")
        dim, found, missing, vectors = service.lookup(state, body.ids, body.dim)
        return LookupResponse(version=state.version, dim=dim, found=found, missing=missing, vectors=vectors.tolist())

    @app.get("/v1/versions", response_model=VersionsResponse, tags=["versions"])
    def versions(state: Pinned):
        """The version served, and every finished version of the run's store."""
        return VersionsResponse(version=state.version, model=service.model.label,
                                engine="faiss" if service.engine is None else "milvus", base_items=state.base_items,
                                delta_items=state.delta_items, versions=service.versions())

    @app.get("/healthz", response_model=Health, tags=["health"])
    def healthz(state: Pinned):
        """The process is alive."""
        return Health(status="alive", version=state.version)

    @app.get("/readyz", response_model=Health, responses={503: {"model": ErrorResponse}}, tags=["health"])
    def readyz(state: Pinned):
        """A model and an index are loaded, the embedding worker runs, and a self-test search succeeds."""
        if not service.batcher.alive:
            raise RequestError(503, "the embedding worker has stopped")
        try:
            self_test(state)
        except Exception as exc:
            raise RequestError(503, f"self-test failed: {exc}") from None
        return Health(status="ready", version=state.version)

    @app.get("/metrics", tags=["health"], response_class=Response)
    def metrics(state: Pinned):
        """Prometheus metrics: requests, latencies, errors, queue size, batch sizes, the version served."""
        content, media_type = service.metrics.exposition()
        return Response(content, media_type=media_type)


QUERY_KINDS = ("text", "image", "vector", "item_id")


def search_query(body: SearchRequest, service: Service) -> SearchQuery:
    """The one query a search holds, its text or image checked against the limits."""
    given = {kind: value for kind, value in body.model_dump(include=set(QUERY_KINDS)).items() if value is not None}
    if len(given) != 1:
        raise RequestError(422, f"give exactly one of {', '.join(QUERY_KINDS)} (got {', '.join(given) or 'none'})")
    [(kind, value)] = given.items()
    if kind == "text":
        return SearchQuery(kind, Input(check_text(value, service.limits, "text"), None))
    if kind == "image":
        return SearchQuery(kind, Input(None, photo(value, service.limits, "image")))
    return SearchQuery(kind, value)


bearer = HTTPBearer(auto_error=False, description="the admin key (MOON_ADMIN_KEY) as a bearer token")


def admin_only(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    key = request.app.state.key
    if key is None:
        return
    if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), key.encode()):
        raise RequestError(401, "admin routes need the key of MOON_ADMIN_KEY: send `Authorization: Bearer <key>`")


def add_admin_routes(app: FastAPI, service: Service) -> None:
    @app.post("/v1/admin/reload", response_model=ReloadResponse, responses=ADMIN_ERRORS, tags=["admin"],
              dependencies=[Depends(admin_only)])
    def reload(request: Request, body: ReloadRequest | None = None):
        """Loads a store version beside the served one and swaps it in once it passed its self-test; the
        served version keeps answering meanwhile, and stays if the load fails. One reload at a time (409)."""
        done = service.reload(body.version if body else None)
        request.state.moon_version = done["version"]
        return ReloadResponse(**done)

    @app.post("/v1/admin/items", response_model=ItemsResponse, responses=ADMIN_ERRORS, tags=["admin"],
              dependencies=[Depends(admin_only)])
    def add_items(request: Request, body: ItemsRequest):
        """Adds new items: embedded by the serving model, searchable at once, kept in the store version and
        the run's served_items table."""
        done = service.add_items([item.model_dump() for item in body.items])
        request.state.moon_version = done["version"]
        return ItemsResponse(**done)


# ---------------------------------------------------------------- errors


def add_error_handlers(app: FastAPI, service: Service) -> None:
    def answer(request: Request, status: int, message: str, headers: dict | None = None) -> JSONResponse:
        version = getattr(request.state, "moon_version", None) or (service.state.version if service.state else None)
        return JSONResponse({"error": message, "version": version}, status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError):
        headers = {429: {"retry-after": "1"}, 401: {"www-authenticate": "Bearer"}}.get(exc.status)
        return answer(request, exc.status, str(exc), headers)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):
        return answer(request, 422, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(error["type"] == "json_invalid" for error in errors):
            detail = next(error for error in errors if error["type"] == "json_invalid")
            reason = detail.get("ctx", {}).get("error", "parse error")
            return answer(request, 400, f"the body is not valid JSON ({reason}, at character {detail['loc'][-1]}): "
                          "send a JSON object")
        return answer(request, 422, "; ".join(describe(error) for error in errors))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = str(exc.detail)
        if exc.status_code in (404, 405) and "route" not in request.scope:
            message = f"no route {request.method} {request.url.path}: the routes are listed on /docs"
        return answer(request, exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return answer(request, 500, f"internal error ({type(exc).__name__}: {exc})")


def describe(error: dict) -> str:
    """One validation error as 'body.k: Input should be a valid integer (got 'ten')'."""
    where = ".".join(str(part) for part in error["loc"])
    if error["type"] == "missing":
        return f"{where}: missing"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown field (see the request model on /docs)"
    return f"{where}: {error['msg']} (got {error.get('input')!r:.80})"


# ---------------------------------------------------------------- the guard around every request


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over serve.max_body_bytes={limit:,} bytes")


class Guard:
    """Pure ASGI middleware: refuses bodies over serve.max_body_bytes (from Content-Length, or while a
    chunked body streams in), names the version in every response's header, and records metrics."""

    def __init__(self, app, service: Service):
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status, limit = time.perf_counter(), [500], self.service.limits.max_body_bytes
        received = [0]
        scope.setdefault("state", {})  # where a handler names the version it answered from

        async def counted():
            message = await receive()
            received[0] += len(message.get("body", b""))
            if received[0] > limit:
                raise BodyTooLarge(limit)
            return message

        async def named(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                version = scope.get("state", {}).get("moon_version") or self.current_version()
                if version:
                    MutableHeaders(scope=message)[VERSION_HEADER] = version
            await send(message)

        try:
            if declared_length(scope) > limit:
                await self.refuse(scope, named, BodyTooLarge(limit))
            else:
                await self.app(scope, counted, named)
        finally:
            route = scope.get("route")
            self.service.metrics.served(getattr(route, "path", "unmatched"), status[0], time.perf_counter() - started)

    def current_version(self) -> str | None:
        return self.service.state.version if self.service.state else None

    async def refuse(self, scope, send, error: BodyTooLarge) -> None:
        response = JSONResponse({"error": error.detail, "version": self.current_version()}, status_code=413)
        await response(scope, None, send)


def declared_length(scope) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
