"""The server's request and response models, in one place: the native API (`POST /generate`),
the OpenAI-compatible API (`/v1/completions`, `/v1/chat/completions`, `/v1/models`) and the code
browser. Requests forbid unknown fields and check types strictly (no "30" for a count), so a bad
request is a 4xx naming its field, never a silent default; typed responses make the OpenAPI schema
at `/docs` complete.
"""

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    create_model,
    model_validator,
)

from next_speed.core.config import fields_of
from next_speed.generation.generate import GenParams

# ---------------------------------------------------------------------------------- native API


# The generation knobs a request of the OpenAI-compatible API may set beside OpenAI's own fields.
OPENAI_EXTRAS = (
    "n_cand",
    "rerank",
    "plan_temp",
    "plan_top_k",
    "plan_deep",
    "repetition_penalty",
    "no_repeat_ngram",
    "repeat_cos",
    "repeat_span",
    "parallel",
    "parallel_verify",
)


def knob_fields(names=None, caps: dict[str, int] | None = None) -> dict[str, Any]:
    """Optional request fields for generation knobs (all of GenParams but gen_steps, or `names`),
    built from the knobs themselves: the knob's type checked strictly (no "30" for a count, no
    boolean for a number), its finite range under the server's `caps`, its help as description.
    The one request-parameter model of the native API, the OpenAI-compatible API and, through the
    same knobs, the Python API and the CLI."""
    caps = caps or {}
    fields: dict[str, Any] = {}
    for f, tp, _ in fields_of(GenParams):
        if f.name == "gen_steps" or (names is not None and f.name not in names):
            continue
        m = f.metadata
        hi = m.get("max") if f.name not in caps else min(caps[f.name], m.get("max") or caps[f.name])
        extra = {"allow_inf_nan": False} if tp is float else {}
        field = Field(strict=True, ge=m.get("min"), le=hi, description=m.get("help"), **extra)
        fields[f.name] = (Annotated[tp, field] | None, None)
    return fields


def generate_request_model(max_n_cand: int, max_new_tokens_cap: int, max_sentences_cap: int) -> type[BaseModel]:
    """The body of POST /generate: its `params` are the generation knobs (`knob_fields`) under the
    server's caps, with the field's name in every error."""
    fields = knob_fields(caps={"n_cand": max_n_cand, "max_new_tokens": max_new_tokens_cap})

    def no_gen_steps(cls, data):
        if isinstance(data, dict) and "gen_steps" in data:
            raise ValueError("gen_steps: set the number of sentences with max_sentences")
        return data

    Params = create_model(
        "GenerationParams",
        __config__=ConfigDict(extra="forbid"),
        __validators__={"no_gen_steps": model_validator(mode="before")(no_gen_steps)},
        **fields,
    )
    return create_model(
        "GenerateRequest",
        __config__=ConfigDict(extra="forbid"),
        __doc__="Body of POST /generate.",
        prompt=(str, Field(..., strict=True, description="text to continue (one or more sentences)")),
        max_sentences=(int, Field(3, strict=True, ge=1, le=max_sentences_cap, description="sentences to generate")),
        params=(Params, Field(default_factory=Params, description="per-call overrides of the generation knobs")),
        plan=(
            list[Any] | None,
            Field(None, description="plan control: per sentence null, codes, an example sentence or an object"),
        ),
    )


class GenerateResponse(BaseModel):
    """Answer of POST /generate."""

    text: str = Field(..., description="the generated continuation")
    sentences: list[str]
    planned: list[list[int]] = Field(..., description="the plan's code tuple of each sentence")
    realized: list[list[int]] = Field(..., description="each written sentence's own codes")
    stop_reason: str = Field(..., description="steps, length, stop, repeat or empty")
    timings: dict[str, float] = Field(..., description="seconds per stage; queued: before the first step")


class HealthResponse(BaseModel):
    status: Literal["ok"]
    device: str | None = None
    dtype: str | None = None


class ErrorResponse(BaseModel):
    """A native endpoint's error (the OpenAI-compatible ones answer in OpenAI's envelope)."""

    error: str


# ---------------------------------------------------------------------------------- code browser


class EncodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: StrictStr = Field(..., description="a sentence to embed and quantize")


class EncodeResponse(BaseModel):
    text: str
    codes: list[int] = Field(..., description="the sentence's RVQ code tuple, level 0 first")


# ---------------------------------------------------------------------------------- OpenAI-compatible API

Number = StrictInt | StrictFloat
PlanEntry = None | list[StrictInt] | StrictStr | dict[str, Any]

# fields of OpenAI's API that next-speed does not implement: refused by name, never ignored
UNSUPPORTED = (
    "logprobs",
    "top_logprobs",
    "echo",
    "best_of",
    "suffix",
    "logit_bias",
    "frequency_penalty",
    "presence_penalty",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool | None = None


class _OpenAIFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr = Field(..., description="the served model's id (GET /v1/models)")
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = Field(
        None, description="decoder tokens of all sentences together"
    )
    temperature: Annotated[Number, Field(ge=0, le=2, allow_inf_nan=False)] | None = Field(
        None, description="0 = greedy"
    )
    top_p: Annotated[Number, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    n: Annotated[StrictInt, Field(ge=1)] = Field(1, description="independent choices (choice i seeded seed + i)")
    seed: StrictInt | None = Field(None, description="default: the server's SEED")
    stop: StrictStr | list[StrictStr] | None = Field(None, description="up to 4 stop strings")
    stream: StrictBool = False
    stream_options: StreamOptions | None = Field(
        None, description="include_usage is accepted; usage is always in the final chunk"
    )
    user: StrictStr | None = None
    # sentence-level extras
    max_sentences: Annotated[StrictInt, Field(ge=1)] | None = Field(
        None, description="sentences at most (default 3; the cap when max_tokens is set)"
    )
    plan: list[PlanEntry] | None = Field(
        None, description="plan control: per sentence null, codes, an example sentence or an object"
    )
    return_candidates: StrictBool = False


# OpenAI's fields, then the generation knobs of OPENAI_EXTRAS as the knobs define them
CommonRequest = create_model(
    "CommonRequest", __base__=_OpenAIFields, __doc__="Fields shared by completions and chat completions.",
    **knob_fields(OPENAI_EXTRAS),
)  # fmt: skip


class CompletionRequest(CommonRequest):
    prompt: StrictStr | list[StrictStr] = Field(..., description="the text to continue (one prompt)")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[dict[str, Any]]
    name: StrictStr | None = None


class ChatRequest(CommonRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    next_speed: dict[str, Any] = Field(..., description="K, V, code mode, caps and generation defaults")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class SentenceInfo(BaseModel):
    """One generated sentence as the OpenAI-compatible API shows it (every choice's `sentences`)."""

    text: str
    planned: list[int] = Field(..., description="the plan's code tuple")
    realized: list[int] | None = Field(None, description="the written sentence's own codes")
    agreement: int = Field(..., description="levels matched from level 0")
    levels_matched: list[bool]
    pinned: int = Field(..., description="levels fixed by plan control")
    tokens: int
    lookahead: int | None = Field(None, description="PARALLEL: sentences ahead of the real text it was drafted")
    verify: dict[str, Any] | None = Field(None, description="PARALLEL_VERIFY: the draft's likelihoods")
    chosen: int | None = Field(None, description="return_candidates: the chosen candidate's index")
    candidates: list[dict[str, Any]] | None = Field(None, description="return_candidates: every candidate")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _ChoiceBase(BaseModel):
    index: int
    finish_reason: Literal["stop", "length"]
    stop_reason: str = Field(..., description="the loop's own: steps, length, stop, repeat or empty")
    sentences: list[SentenceInfo]
    timings: dict[str, float]


class CompletionChoice(_ChoiceBase):
    text: str
    logprobs: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_ChoiceBase):
    message: AssistantMessage


class CompletionResponse(BaseModel):
    """POST /v1/completions without `stream` (with it: server-sent events of text_completion chunks)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatCompletionResponse(BaseModel):
    """POST /v1/chat/completions without `stream` (with it: chat.completion.chunk events)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
