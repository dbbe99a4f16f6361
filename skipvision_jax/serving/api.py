"""OpenAI's chat completions API over the scheduler, on FastAPI.

    POST /v1/chat/completions   messages (text and base64 `image_url` parts), max_tokens /
                                max_completion_tokens, temperature (0: greedy), top_p, seed, stop,
                                stream (SSE), stream_options.include_usage; extra fields kv_policy,
                                kv_budget, kv_compression choose the request's KV setting,
                                ignore_eos (vLLM's) runs an answer to max_tokens
    GET  /v1/models             the one model served
    GET  /health                scheduler counters: compilations, prefix cache hits/misses/bytes

Bad requests get OpenAI's error JSON with a 4xx status and change nothing.
Every field is checked for its type and range as OpenAI's API does (strict
JSON types: `true` is no integer, "0.5" no number, NaN no penalty). Fields
that would change the answer and are not built are refused (400, naming the
field) rather than ignored: `n` > 1, tools and function calls, logprobs,
`response_format` other than text, `logit_bias`, and non-zero
`presence_penalty` / `frequency_penalty`. A `max_tokens` over the server's
limit is clamped to it (the answer then ends with finish_reason "length"),
as lmms-eval asks for 1,024 tokens by default; images over the pixel limit
are refused before they are decoded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import random
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from skipvision_jax.data.images import decode_image
from skipvision_jax.data.llava import Turn
from skipvision_jax.kvcache import KVPolicy
from skipvision_jax.partition import SequenceLayout
from skipvision_jax.presses import press_named
from skipvision_jax.serving.scheduler import Event, Generation, QueueFull, Scheduler, ShuttingDown

RETRY_AFTER_S = 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self, headers: dict | None = None) -> JSONResponse:
        kind = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error"}
        body = {
            "error": {
                "message": self.message,
                "type": kind.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }
        return JSONResponse(body, status_code=self.status, headers=headers)


# ---- the request body ----------------------------------------------------------------------


# Strict JSON types throughout (`true` is no integer, "1" no number), as OpenAI's API.
STRICT = ConfigDict(strict=True)


class ImageURL(BaseModel):
    model_config = STRICT

    url: str
    detail: str | None = None


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = STRICT

    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # json_schema carries its schema

    type: Literal["text", "json_object", "json_schema"]


def finite(low: float, high: float, **kwargs) -> Any:
    return Field(None, ge=low, le=high, allow_inf_nan=False, **kwargs)


class ChatRequest(BaseModel):
    # Fields no one asked us to read (metadata, store, ...) change no answer and are ignored.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = finite(0, 2)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, max_length=4)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int | None = Field(None, ge=1, le=128)
    presence_penalty: float | None = finite(-2, 2)
    frequency_penalty: float | None = finite(-2, 2)
    logit_bias: dict[str, int] | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    # Ours: the request's KV setting (fields not given come from the server's).
    kv_policy: str | None = None
    kv_budget: int | None = None
    kv_compression: float | None = finite(0, 1)
    ignore_eos: bool | None = False  # vLLM's: answers run to max_tokens (load tests)


# Fields that would change the answer, and the values that do not: refused otherwise.
NOT_BUILT = {
    "n": ((None, 1), "only one choice per request is supported"),
    "presence_penalty": ((None, 0.0), "penalties are not supported (only 0)"),
    "frequency_penalty": ((None, 0.0), "penalties are not supported (only 0)"),
    "logit_bias": ((None, {}), "logit biases are not supported"),
    "logprobs": ((None, False), "not supported"),
    "top_logprobs": ((None, 0), "not supported"),
    "tools": ((None, []), "tool and function calls are not supported"),
    "tool_choice": ((None, "none"), "tool and function calls are not supported"),
    "functions": ((None, []), "tool and function calls are not supported"),
    "function_call": ((None, "none"), "tool and function calls are not supported"),
}


def parse_request(body: bytes) -> ChatRequest:
    try:
        request = ChatRequest.model_validate_json(body)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {first['msg']}") from None
        where = ".".join(str(part) for part in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None
    for field, (harmless, why) in NOT_BUILT.items():
        if getattr(request, field) not in harmless:
            raise ApiError(400, f"{field}: {why}", param=field)
    if request.response_format is not None and request.response_format.type != "text":
        raise ApiError(
            400,
            f"response_format: {request.response_format.type!r} is not supported (only text)",
            param="response_format",
        )
    return request


def image_bytes(url: str) -> bytes:
    """A `data:<type>;base64,<payload>` URL's bytes; the server fetches nothing."""
    if not url.startswith("data:"):
        raise ApiError(
            400,
            "image_url: only inline images (data:<type>;base64,<payload> URLs) are taken; the server fetches no URL",
            param="messages",
        )
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ApiError(400, "image_url: a data URL must be base64 (data:<type>;base64,<payload>)", param="messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image_url: the data URL's payload is not valid base64", param="messages") from None


def conversation(messages: list[Message]) -> tuple[bytes, list[Turn]]:
    """The one image and the turns, in the order the model's prompt format
    takes: an optional system turn, then user and assistant turns that
    alternate, starting and ending with a user turn, the image in the first."""
    turns, images = [], []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        found = [part.image_url.url for part in parts if isinstance(part, ImagePart)]
        if found and (role != "user" or any(turn.role == "user" for turn in turns)):
            raise ApiError(400, f"messages[{i}]: the image must be in the first user message", param="messages")
        images += found
        turns.append(Turn(role, "\n".join(part.text for part in parts if isinstance(part, TextPart))))
    roles = [turn.role for turn in turns]
    body = roles[1:] if roles[0] == "system" else roles
    if not body or body[-1] != "user" or any(r != ("user" if j % 2 == 0 else "assistant") for j, r in enumerate(body)):
        raise ApiError(
            400,
            "messages: expected an optional system message, then user and assistant messages in turn, ending with a user message",
            param="messages",
        )
    if len(images) != 1:
        raise ApiError(400, f"messages: the model takes exactly one image, got {len(images)}", param="messages")
    return image_bytes(images[0]), turns


def request_policy(default: KVPolicy, request: ChatRequest) -> KVPolicy:
    """The server's KV setting with the request's changes: a budget given
    replaces the server's ratio and the other way round; a press named takes
    the server's knobs where it has them, and one that keeps a fixed set
    (full, skip_vision) named alone takes neither budget nor ratio."""
    if request.kv_policy is None and request.kv_budget is None and request.kv_compression is None:
        return default
    sized = request.kv_budget is not None or request.kv_compression is not None
    budget, compression = (
        (request.kv_budget, request.kv_compression) if sized else (default.budget, default.compression)
    )
    try:
        press = default.press if request.kv_policy is None else press_named(request.kv_policy)
        policy = KVPolicy(press).with_knobs_of(default)
        if policy.fixed and not sized:
            return policy
        return dataclasses.replace(policy, budget=budget, compression=compression)
    except ValueError as err:
        raise ApiError(400, str(err), param="kv_policy") from None


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body has {declared} bytes, over the server's limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the body is over the server's limit of {limit} bytes")
    return bytes(body)


# ---- the app -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ApiSettings:
    model_id: str
    max_body_bytes: int = 20 * 2**20
    seed: int = 0  # draws the seeds of requests that give none
    max_image_pixels: int = 25_000_000  # checked from the image header, before decoding


def create_app(scheduler: Scheduler, settings: ApiSettings) -> FastAPI:
    seeds = random.Random(settings.seed)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="skipvision_jax", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(err).__name__}: {err}").response()

    @app.get("/health")
    async def health() -> dict:
        return scheduler.stats()

    @app.get("/v1/models")
    async def models() -> dict:
        model = {"id": settings.model_id, "object": "model", "created": created, "owned_by": "skipvision_jax"}
        return {"object": "list", "data": [model]}

    def prepare(request: ChatRequest, emit: Callable[[Event], None]) -> Generation:
        """Everything that can be wrong with a request, found before it waits for a slot."""
        image, turns = conversation(request.messages)
        try:
            batch, model_cfg = scheduler.encode(decode_image(image, settings.max_image_pixels), turns)
        except ValueError as err:  # ImageError and the prompt's errors are ValueErrors
            raise ApiError(400, str(err), param="messages") from None
        # Clamped, not refused: the answer is cut at the limit with finish_reason "length" (vLLM refuses
        # only what exceeds the context; our caches are sized by the limit, which plays that part).
        limit = scheduler.max_new_tokens
        max_tokens = min(request.max_completion_tokens or request.max_tokens or limit, limit)
        policy = request_policy(scheduler.default_policy, request)
        try:
            scheduler.admit(policy)
        except ValueError as err:
            raise ApiError(400, str(err), param="kv_policy") from None
        stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
        return Generation(
            ids=batch["input_ids"][0],
            pixels=batch["pixels"][0],
            model_cfg=model_cfg,
            policy=policy,
            max_tokens=max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=(request.seed if request.seed is not None else seeds.getrandbits(32)) % 2**32,
            stop=stop,
            stream=bool(request.stream),
            ignore_eos=bool(request.ignore_eos),
            emit=emit,
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request) -> Response:
        request = parse_request(await read_body(http, settings.max_body_bytes))
        if request.model is not None and request.model != settings.model_id:
            raise ApiError(404, f"the model `{request.model}` does not exist", param="model", code="model_not_found")
        events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        generation = await asyncio.to_thread(prepare, request, emit)
        try:
            scheduler.submit(generation)
        except (QueueFull, ShuttingDown) as err:
            return ApiError(503, str(err)).response(headers={"Retry-After": str(RETRY_AFTER_S)})
        answer = Answer(settings.model_id, SequenceLayout.from_config(generation.model_cfg, len(generation.ids)).length)
        if generation.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return StreamingResponse(
                answer.stream(events, generation, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.25)
            except TimeoutError:
                if await http.is_disconnected():
                    generation.cancelled.set()  # its slot is freed at the next step
                    return Response(status_code=499)
                continue
            if event.error is not None:
                raise ApiError(500, event.error)
            if event.finish_reason is not None:
                return JSONResponse(answer.completion(event))

    return app


@dataclasses.dataclass
class Answer:
    """OpenAI's response objects for one request."""

    model_id: str
    prompt_tokens: int  # the sequence the model reads: text and visual tokens
    id: str = dataclasses.field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def usage(self, event: Event) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": event.completion_tokens,
            "total_tokens": self.prompt_tokens + event.completion_tokens,
        }

    def _object(self, kind: str, choices: list[dict], **extra) -> dict:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model_id,
            "choices": choices,
            **extra,
        }

    def completion(self, event: Event) -> dict:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": event.text},
            "finish_reason": event.finish_reason,
            "logprobs": None,
        }
        return self._object("chat.completion", [choice], usage=self.usage(event))

    def chunk(self, delta: dict, finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return sse(self._object("chat.completion.chunk", [choice]))

    async def stream(self, events: asyncio.Queue, generation: Generation, include_usage: bool):
        """SSE chunks: the role, the text as it comes, the finish reason, (usage), then [DONE]."""
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            while True:
                event = await events.get()
                if event.error is not None:
                    yield sse({"error": {"message": event.error, "type": "server_error", "param": None, "code": None}})
                    break
                if event.delta:
                    yield self.chunk({"content": event.delta})
                if event.finish_reason is not None:
                    yield self.chunk({}, event.finish_reason)
                    if include_usage:
                        yield sse(self._object("chat.completion.chunk", [], usage=self.usage(event)))
                    break
            yield "data: [DONE]\n\n"
        finally:
            generation.cancelled.set()  # a client gone mid-stream frees its slot; after the end, a no-op


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
