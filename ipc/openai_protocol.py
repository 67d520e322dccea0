"""The OpenAI wire format of ipc/http_server.py: request models (pydantic), their translation to
SamplingParams and chat messages, and the response / chunk / error bodies. No I/O here.

Sampling follows OpenAI's defaults (temperature 1, top_p 1; temperature 0 is greedy); vLLM's
extensions top_k, ignore_eos, repetition_penalty, stop_token_ids, skip_special_tokens are
accepted too. Every finished response carries `epd_metrics`: the request's stage timeline.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.request import RequestOutput, TokenLogprob
from engine.sampling import RequestError, SamplingParams
from engine.tokenizer import IMAGE_TAG

__all__ = ["ChatCompletionRequest", "CompletionRequest", "ValidationError", "chat_messages", "error_body",
           "sampling_of", "validation_message"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields of the API we do not serve (user, tools ...) are ignored


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str
    detail: str | None = None


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL | str


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class _Sampling(_Model):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True


class ChatCompletionRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = None  # the legacy API: the number of top alternatives
    echo: bool = False


def sampling_of(body: _Sampling, max_tokens: int) -> SamplingParams:
    """The engine's SamplingParams for a request body (max_tokens resolved by the caller);
    RequestError (naming the field and its limit) for values the engine refuses."""
    if isinstance(body, ChatCompletionRequest):
        logprobs, top = body.logprobs, body.top_logprobs or 0
    else:
        logprobs, top = body.logprobs is not None, body.logprobs or 0
    given = {"top_p": body.top_p, "top_k": body.top_k, "presence_penalty": body.presence_penalty,
             "frequency_penalty": body.frequency_penalty, "repetition_penalty": body.repetition_penalty,
             "stop_token_ids": body.stop_token_ids}
    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
        seed=body.seed, stop=body.stop or (), n=body.n, ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens, logprobs=logprobs, top_logprobs=top,
        **{k: v for k, v in given.items() if v is not None})


def requested_max_tokens(body: _Sampling) -> int | None:
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        return body.max_completion_tokens
    return body.max_tokens


def chat_messages(body: ChatCompletionRequest) -> tuple[list[dict], list[tuple[str, str]]]:
    """(messages for Tokenizer.render_chat: content text with `<image>` where each image part
    was; the image URLs in order, each with the field that named it, for error messages)."""
    messages, images = [], []
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        if m.content is None or isinstance(m.content, str):
            messages.append({"role": role, "content": m.content or ""})
            continue
        text = []
        for j, part in enumerate(m.content):
            if isinstance(part, TextPart):
                text.append(part.text)
            else:
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                images.append((url, f"messages[{i}].content[{j}].image_url"))
                text.append(IMAGE_TAG)
        messages.append({"role": role, "content": "".join(text)})
    if not messages:
        raise RequestError("messages: must hold at least one message")
    return messages, images


def completion_prompt(body: CompletionRequest) -> str:
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise RequestError(f"prompt: a list of {len(prompt)} prompts; this server takes one per request")
        prompt = prompt[0]
    if body.echo:
        raise RequestError("echo: not supported by this server")
    return prompt


# ----------------------------------------------------------------------------- errors

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "service_unavailable"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error JSON; param: the field the message names (found in it when not given)."""
    if param is None:
        found = re.match(r"(?:sampling\.)?([A-Za-z_][\w.\[\]]*)(?: = |: )", message)
        param = found.group(1) if found else None
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code or str(status)}}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """Pydantic / FastAPI validation errors as one message naming each field (a union's
    alternatives joined by "or"), and the first field."""
    by_field: dict[str, list[str]] = {}
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body" and not _is_type_tag(x))
        msgs = by_field.setdefault(loc or "body", [])
        if err.get("msg", "invalid") not in msgs:
            msgs.append(err.get("msg", "invalid"))
    parts = [f"{loc}: {' or '.join(msgs)}" for loc, msgs in list(by_field.items())[:5]]
    return "; ".join(parts), next(iter(by_field), None)


def _is_type_tag(part: object) -> bool:
    """The union member names pydantic puts into an error's location ("str", "list[str]" ...)."""
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "none", "dict", "list"})


# ----------------------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def epd_metrics(out: RequestOutput) -> dict:
    """The request's stage timeline (names a load generator reads: keep them)."""
    b = out.ttft_breakdown
    return {"ttft_s": out.ttft_s, "e2e_s": out.e2e_s, "tokens_per_s": out.tokens_per_s,
            "queue_s": b.get("queue_s", 0.0), "preprocess_s": b.get("preprocess_s", 0.0),
            "encode_s": b.get("encode_s", 0.0), "wait_s": b.get("wait_s", 0.0),
            "prefill_s": b.get("prefill_s", 0.0), "token_times_s": list(out.token_times_s),
            "handoff": dict(out.handoff)}


def usage(out: RequestOutput) -> dict:
    completion = sum(len(o.token_ids) for o in out.outputs) if out.outputs else len(out.token_ids)
    prompt = len(out.prompt_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chat_logprobs(records: list[TokenLogprob] | None, token_text) -> dict | None:
    if records is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(r.token_id, r.logprob), "top_logprobs": [entry(t, lp) for t, lp in r.top]}
                        for r in records]}


def _completion_logprobs(records: list[TokenLogprob] | None, token_text) -> dict | None:
    if records is None:
        return None
    tokens = [token_text(r.token_id) for r in records]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [r.logprob for r in records],
            "top_logprobs": [{token_text(t): lp for t, lp in r.top} for r in records], "text_offset": offsets}


def response_body(kind: str, rid: str, model: str, out: RequestOutput, token_text) -> dict:
    """The non-streamed body of a finished request; kind "chat" or "completion". token_text(id)
    -> the token's text (for logprobs)."""
    choices = []
    for o in out.outputs:
        if kind == "chat":
            choices.append({"index": o.index, "message": {"role": "assistant", "content": o.text},
                            "logprobs": _chat_logprobs(o.logprobs, token_text), "finish_reason": o.finish_reason})
        else:
            choices.append({"index": o.index, "text": o.text, "logprobs": _completion_logprobs(o.logprobs, token_text),
                            "finish_reason": o.finish_reason})
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices, "usage": usage(out),
            "epd_metrics": epd_metrics(out)}


def chunk(kind: str, rid: str, model: str, created: int, index: int, text: str | None = None,
          finish_reason: str | None = None, role: bool = False) -> dict:
    """One streamed chunk for one choice: a role (chat, first), a text delta, or the finish."""
    if kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
