"""The request body of POST /v1/chat/completions, validated as shared/API.md defines it.

Strict types (a number sent as a string is a 400, as on the hosted API); unknown fields are
ignored; omitted fields stay None so the deployment's defaults can fill them.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmserve.errors import InvalidParameter


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    # "developer" is OpenAI's newer name for the system role (o1 and later); templates know "system".
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _has_content(self):
        # Only an assistant turn that calls tools may come without content.
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        try:
            self.text().encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("content is not valid Unicode text (lone surrogate)") from None
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def for_template(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [_call_for_template(c.model_dump()) for c in self.tool_calls]
            # A turn that only calls tools has no content (None), as OpenAI and transformers
            # write it: DeepSeek-V2.5's template renders the calls only for `content is none`.
            out["content"] = out["content"] or None
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.name:
            out["name"] = self.name
        return out


def _call_for_template(call: dict[str, Any]) -> dict[str, Any]:
    """Chat templates write `arguments | tojson`, so they take the arguments as an object; the
    API carries them as a JSON string. Arguments that are not a JSON object stay a string."""
    function = call.get("function") or {}
    try:
        args = json.loads(function.get("arguments") or "{}")
    except ValueError:
        return call
    if not isinstance(args, dict):
        return call
    return {**call, "function": {**function, "arguments": args}}


class StreamOptions(_Body):
    include_usage: bool = False


class JSONSchemaFormat(_Body):
    name: str
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class FunctionDef(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class SamplingFields(_Body):
    """Sampling fields shared by chat and legacy completions; None means the deployment's default."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    n: int | None = Field(default=None, ge=1)
    seed: int | None = None
    # vLLM's extra sampling fields (benchmark tools send them).
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    # vLLM's scheduling priority (lower runs first; 0 the default). Batch API lines run at
    # BATCH_PRIORITY whatever they ask for.
    priority: int | None = Field(default=None, ge=-1000, le=1000)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list):
            if len(v) > 4:
                raise ValueError("at most 4 stop sequences are allowed")
            if not all(isinstance(s, str) for s in v):
                raise ValueError("stop sequences must be strings")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v):
        if v is not None and not -(2**63) <= v < 2**64:
            raise ValueError("seed must fit in 64 bits")
        return v


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)  # vLLM's: score the prompt, top k


class CompletionRequest(SamplingFields):
    """POST /v1/completions (the legacy prompt API): one prompt, as text or token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    # 0 only with echo: score the prompt, generate nothing (as OpenAI and vLLM answer it).
    max_tokens: int | None = Field(default=None, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)  # how many top alternatives per token
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)  # vLLM's: score the prompt, top k
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str | list):
            if len(v) != 1:
                raise ValueError("send one prompt per request (a list of several prompts is not supported)")
            v = v[0]
        if isinstance(v, list) and not v:
            raise ValueError("the prompt is empty")
        return v


class TokenizeRequest(_Body):
    """POST /tokenize: text (`prompt`) or a conversation (`messages`, rendered by the chat template)."""

    model: str
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True  # for `prompt`; a rendered conversation has its own
    add_generation_prompt: bool = True  # for `messages`

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either `prompt` or `messages`")
        return self


class DetokenizeRequest(_Body):
    model: str
    tokens: list[int]


def _text_only(payload: dict) -> None:
    """A clear 400 for images, audio or files in a message, before the generic schema error."""
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return
    for i, m in enumerate(messages):
        parts = m.get("content") if isinstance(m, dict) else None
        if not isinstance(parts, list):
            continue
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise InvalidParameter("messages", f"messages[{i}] has a content part of type {kind!r}: "
                                   "this model takes text only", "unsupported_content")


def parse_chat_request(payload: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; the first problem is an InvalidParameter naming its field (a 400)."""
    if not isinstance(payload, dict):
        raise InvalidParameter(None, "the request body must be a JSON object")
    _text_only(payload)
    return validate(ChatCompletionRequest, payload)


def validate(schema: type[BaseModel], payload: Any):
    """Validate a decoded JSON body against `schema`; the first problem is an InvalidParameter naming its field."""
    if not isinstance(payload, dict):
        raise InvalidParameter(None, "the request body must be a JSON object")
    try:
        return schema.model_validate(payload)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"]]
        param = loc[0] if loc else None
        where = ".".join(loc)
        msg = err["msg"].removeprefix("Value error, ")
        if not loc:
            raise InvalidParameter(None, msg) from None
        if err["type"] == "missing":
            raise InvalidParameter(param, f"missing required field {where!r}", "missing_required_parameter") from None
        raise InvalidParameter(param, f"invalid value for {where!r}: {msg}") from None
