"""The OpenAI Files and Batches API as FastAPI routes (OpenAPI docs at /docs).

Every /v1 route needs `Authorization: Bearer KEY` (workers/api/auth.py); files and
batches belong to the key that created them, and another key is told they do not exist.
Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so the
`openai` SDK raises its own exceptions (AuthenticationError, NotFoundError, ...). The
handlers are plain functions: FastAPI runs them in its thread pool, where the store's
blocking calls belong.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from jobs import limits
from jobs.errors import ServiceUnavailable
from jobs.openai_requests import ENDPOINTS
from jobs.settings import mask_secrets
from workers.api import batches, objects
from workers.api.auth import ApiKeys
from workers.client import Client

# How often the server looks at batches nobody polls, to expire them on time.
EXPIRY_SWEEP_SECONDS = 30.0
_CHUNK = 1 << 20

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code


def _not_found(what: str, object_id: str) -> ApiError:
    return ApiError(404, f"No {what} with id {object_id!r}", code=f"{what}_not_found")


class BatchRequest(BaseModel):
    """POST /v1/batches: OpenAI's fields; any other is refused, not ignored."""

    model_config = ConfigDict(extra="forbid")
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


def _owner(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """The owner id of the request's key; a 401 without an accepted one."""
    found = request.app.state.keys.owner(authorization)
    if found is None:
        raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")
    return found


Owner = Annotated[str, Depends(_owner)]


def create_app(client: Client, keys: ApiKeys) -> FastAPI:
    """The API over client's store and queue, accepting keys."""
    store = client.store
    stop_sweeping = threading.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        sweeper = threading.Thread(target=_sweep, args=(store, stop_sweeping), daemon=True,
                                   name="batch-expiry")
        sweeper.start()
        yield
        stop_sweeping.set()

    app = FastAPI(title="batchinfer: OpenAI Files and Batches API", lifespan=lifespan)
    app.state.keys = keys

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(status_code=error.status, content={"error": {
            "message": str(error), "type": error.kind, "param": error.param,
            "code": error.code}})

    @app.exception_handler(ServiceUnavailable)
    async def unavailable(request: Request, error: ServiceUnavailable) -> JSONResponse:
        return await api_error(request, ApiError(503, mask_secrets(str(error)),
                                                 kind="server_error"))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        return await api_error(request, ApiError(400, f"{param}: {first.get('msg')}",
                                                 param=param))

    def load(kind: str, object_id: str, who: str) -> dict[str, Any]:
        try:
            return objects.load(store, kind, object_id, who)
        except objects.NotFoundForOwner:
            raise _not_found("file" if kind == "files" else "batch", object_id) from None

    @app.post("/v1/files")
    def upload_file(who: Owner, file: Annotated[UploadFile, File()],
                    purpose: Annotated[str, Form()]) -> dict[str, Any]:
        if purpose != "batch":
            raise ApiError(400, f"purpose must be 'batch', got {purpose!r}", param="purpose")
        file_id = objects.new_file_id()
        with tempfile.TemporaryDirectory(prefix="batchinfer-upload-") as scratch:
            path = Path(scratch) / "content"
            size = _save_upload(file, path)
            store.upload_file(path, objects.content_key(file_id))
        record = {"id": file_id, "object": "file", "bytes": size,
                  "created_at": objects.now(), "filename": Path(file.filename or "").name,
                  "purpose": purpose, "status": "processed", "expires_at": None,
                  "status_details": None, "owner": who}
        objects.save_new(store, "files", record)
        return objects.public(record)

    @app.get("/v1/files")
    def list_files(who: Owner, limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
                   after: str | None = None, purpose: str | None = None) -> dict[str, Any]:
        records, more = objects.page(store, "files", who, limit, after,
                                     lambda r: purpose is None or r["purpose"] == purpose)
        return _list(records, more)

    @app.get("/v1/files/{file_id}")
    def get_file(who: Owner, file_id: str) -> dict[str, Any]:
        return objects.public(load("files", file_id, who))

    @app.get("/v1/files/{file_id}/content")
    def file_content(who: Owner, file_id: str) -> StreamingResponse:
        load("files", file_id, who)
        return StreamingResponse(_chunks(store, objects.content_key(file_id)),
                                 media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    def delete_file(who: Owner, file_id: str) -> dict[str, Any]:
        objects.remove(store, load("files", file_id, who))
        return {"id": file_id, "object": "file", "deleted": True}

    @app.post("/v1/batches")
    def create_batch(who: Owner, request: BatchRequest) -> dict[str, Any]:
        if request.endpoint not in ENDPOINTS:
            raise ApiError(400, f"endpoint must be one of {', '.join(ENDPOINTS)}, got "
                           f"{request.endpoint!r}", param="endpoint")
        try:
            batches.window_seconds(request.completion_window)
            metadata = batches.check_metadata(request.metadata)
        except ValueError as error:
            raise ApiError(400, str(error)) from None
        input_file = load("files", request.input_file_id, who)
        if input_file["purpose"] != "batch":
            raise ApiError(400, "the input file's purpose must be 'batch'",
                           param="input_file_id")
        return objects.public(batches.create_batch(
            client, who, input_file, request.endpoint, request.completion_window, metadata))

    @app.get("/v1/batches")
    def list_batches(who: Owner, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                     after: str | None = None) -> dict[str, Any]:
        records, more = objects.page(store, "batches", who, limit, after)
        return _list([batches.refresh(store, record) for record in records], more)

    @app.get("/v1/batches/{batch_id}")
    def get_batch(who: Owner, batch_id: str) -> dict[str, Any]:
        return objects.public(batches.refresh(store, load("batches", batch_id, who)))

    @app.post("/v1/batches/{batch_id}/cancel")
    def cancel_batch(who: Owner, batch_id: str) -> dict[str, Any]:
        return objects.public(batches.cancel_batch(client, load("batches", batch_id, who)))

    return app


def _list(records: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    data = [objects.public(record) for record in records]
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


def _save_upload(file: UploadFile, path: Path) -> int:
    """Copy an upload to path, refusing it once it is over BATCHINFER_MAX_INPUT_BYTES."""
    ceiling, size = limits.max_input_bytes(), 0
    with path.open("wb") as out:
        while chunk := file.file.read(_CHUNK):
            size += len(chunk)
            if size > ceiling:
                raise ApiError(413, f"the file is over the upload limit of {ceiling} bytes "
                               f"(BATCHINFER_MAX_INPUT_BYTES)", param="file")
            out.write(chunk)
    return size


def _chunks(store: Any, key: str) -> Iterator[bytes]:
    with store.open_read(key) as source:
        while chunk := source.read(_CHUNK):
            yield chunk


def _sweep(store: Any, stop: threading.Event) -> None:
    while not stop.wait(EXPIRY_SWEEP_SECONDS):
        try:
            batches.expire_overdue(store)
        except Exception:  # a store hiccup: the next sweep tries again
            log.exception("the batch expiry sweep failed")


def run_server(host: str, port: int) -> None:
    """`batchinfer serve`: the API on host:port until interrupted. UserError (before
    listening) when there are no API keys."""
    import uvicorn

    keys = ApiKeys.from_env()
    uvicorn.run(create_app(Client(), keys), host=host, port=port, log_level="info")
