"""The OpenAI request bodies the server takes (pydantic), and how each maps to the engine's RequestOptions.

Strict by design: a field this server does not know is a 400 naming it, and a known OpenAI field it does not
implement (logprobs, penalties, tools, n > 1, ...) is a 400 when set to anything but its neutral value, so no
request is ever silently answered as if it had asked for something else. Extensions beside the OpenAI fields
(vLLM's names where they exist): top_k, stop_token_ids, ignore_eos, return_token_ids, and ours: `speculation`
(draft | lookup | off, per request) and `timeout` (seconds).
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from hass_deploy.serving.engine import RequestError, RequestOptions

MAX_STOP_STRINGS = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default: sampled unless asked for 0 (greedy)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # -1 or 0: off (vLLM's convention takes -1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None  # an end-user id, recorded by OpenAI for abuse monitoring; nothing to do here
    # Extensions.
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False
    speculation: Literal["draft", "lookup", "hybrid", "off"] | None = None
    timeout: float | None = Field(None, gt=0)
    # OpenAI fields not implemented: accepted only at their neutral values (checked in `options`).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    top_logprobs: int | None = None

    def options(self) -> RequestOptions:
        """The engine's options, after refusing what this server does not implement."""
        neutral = {"presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
                   "logprobs": (None, False, 0), "top_logprobs": (None, 0), **self._neutral()}
        for name, allowed in neutral.items():
            if getattr(self, name) not in allowed:
                raise RequestError(f"{name} is not supported by this server", name)
        if self.n != 1:
            raise RequestError("n > 1 is not supported: send one request per completion", "n")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed with stream: true", "stream_options")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}", "stop")
        if any(not s for s in stop):
            raise RequestError("stop strings must not be empty", "stop")
        return RequestOptions(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=max(self.top_k, 0), seed=self.seed, stop=tuple(stop),
                              stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
                              speculation=self.speculation, timeout=self.timeout)

    def _neutral(self) -> dict[str, tuple]:
        return {}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Common):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def _neutral(self) -> dict[str, tuple]:
        return {"echo": (False,), "best_of": (None, 1), "suffix": (None, "")}

    def prompt_input(self) -> str | list[int]:
        """The one prompt, as text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise RequestError(f"batched prompts ({len(prompt)} in one request) are not supported: send one "
                                   "request per prompt", "prompt")
            prompt = prompt[0]
        if not prompt:
            raise RequestError("the prompt is empty", "prompt")
        return prompt


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_message(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": self.role, "content": content}


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None

    def _neutral(self) -> dict[str, tuple]:
        return {"tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None,),
                "response_format": (None, {"type": "text"})}

    def options(self) -> RequestOptions:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise RequestError("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        if self.max_completion_tokens is not None:  # the newer name: one request, read through the older one
            return _Common.options(self.model_copy(update={"max_tokens": self.max_completion_tokens}))
        return super().options()
