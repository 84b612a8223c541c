"""The OpenAI-compatible surface of the server: from request fields to generation, and response objects.

`POST /v1/completions` and `POST /v1/chat/completions` (with `stream: true`: one server-sent event
per generated sentence, then a final chunk with `finish_reason` and `usage`, then `data: [DONE]`),
`GET /v1/models`. The shapes follow OpenAI's API reference as vLLM, TGI and llama.cpp serve it.

How the standard fields map to generation (documented in docs/serving.md):
- `max_tokens` (chat: also `max_completion_tokens`): decoder tokens of all sentences together;
  the sentence that crosses the budget is cut there (finish_reason "length").
- `temperature` -> TEMP (0 means greedy decoding, DO_SAMPLE off); `top_p` -> TOP_P; `seed` -> SEED
  (default: the server's SEED, so the same request gives the same text); `n` independent choices,
  choice i seeded `seed + i`; `stop` (up to 4 strings) ends the text where one first occurs.
- Sentence-level extras (pass them with the client's `extra_body`): `max_sentences`, `n_cand`,
  `rerank`, `plan` (plan control, see `generate.check_plan`), `plan_temp`, `plan_top_k`, `plan_deep`,
  `repetition_penalty`, `no_repeat_ngram`, `repeat_cos`, `repeat_span`, `parallel` and `parallel_verify`
  (plan-parallel rendering; the stream still sends the sentences in order), and `return_candidates` (every choice's
  `sentences` then carry the candidates with their codes and scores).
- Every choice carries `sentences`: per sentence its text, planned and realized codes, the levels
  matched (`agreement`), the levels pinned, its token count; and `stop_reason` (the loop's own).
- finish_reason: "length" when max_sentences or max_tokens ended the text, else "stop" (a stop
  string, or the loop's stop rules: an empty or repeated sentence).
- Chat: the decoder continues prose, so the conversation becomes one text: every message's
  content in order (system, user and assistant alike), joined by spaces; the reply continues it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from next_speed.quant.rvq import levels_matched
from next_speed.serving.errors import ApiError
from next_speed.serving.protocol import OPENAI_EXTRAS, ChatMessage, ChatRequest, CommonRequest


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The context text of a conversation: the messages' contents in order, joined by spaces
    (text parts of a list content joined likewise; other part types are refused)."""
    parts = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(
                        400, f"messages[{i}].content[{j}]: only text parts are supported", f"messages[{i}].content"
                    )
                texts.append(part["text"])
            content = " ".join(texts)
        if content.strip():
            parts.append(content.strip())
    if not parts:
        raise ApiError(400, "messages: every message is empty: give at least one sentence", "messages")
    return " ".join(parts)


def generation_kwargs(req: CommonRequest, default_seed: int, max_sentences_cap: int) -> tuple[list[dict], dict]:
    """The `SentenceGenerator.run` keywords of each of the request's `n` choices, and the shared ones."""
    kw: dict[str, Any] = {}
    if req.temperature is not None:
        if req.temperature == 0:
            kw["do_sample"] = False
        elif req.temperature < 0.01:
            raise ApiError(
                400, f"temperature: {req.temperature} is too small: 0 (greedy) or at least 0.01", "temperature"
            )
        else:
            kw.update(temp=req.temperature, do_sample=True)
    if req.top_p is not None:
        if req.top_p < 0.01:
            raise ApiError(400, f"top_p: {req.top_p} is too small: at least 0.01", "top_p")
        kw["top_p"] = req.top_p
    for name in OPENAI_EXTRAS:
        if getattr(req, name) is not None:
            kw[name] = getattr(req, name)
    max_tokens = req.max_tokens
    if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
        max_tokens = req.max_completion_tokens
    if req.max_sentences is not None and req.max_sentences > max_sentences_cap:
        raise ApiError(
            400,
            f"max_sentences: {req.max_sentences} is over the limit of {max_sentences_cap} (MAX_SENTENCES_CAP)",
            "max_sentences",
        )
    max_sentences = req.max_sentences or (max_sentences_cap if max_tokens else min(3, max_sentences_cap))
    shared = {"max_sentences": max_sentences, "plan": req.plan, "max_tokens": max_tokens, "stop": req.stop, **kw}
    seed = default_seed if req.seed is None else req.seed
    return [{**shared, "seed": seed + i} for i in range(req.n)], shared


FINISH = {"steps": "length", "length": "length", "stop": "stop", "repeat": "stop", "empty": "stop"}


def sentence_info(step, with_candidates: bool) -> dict:
    """One generated sentence as the API shows it: text, plan, realization, agreement."""
    matched = [a == b for a, b in zip(step.planned, step.realized or [])]
    agreement = levels_matched(step.planned, step.realized)
    d = {
        "text": step.sentence,
        "planned": step.planned,
        "realized": step.realized,
        "agreement": agreement,
        "levels_matched": matched,
        "pinned": step.pinned,
        "tokens": step.tokens,
    }
    if step.lookahead:  # drafted ahead of the real text (PARALLEL), and how it was verified
        d["lookahead"] = step.lookahead
        if step.verify is not None:
            d["verify"] = step.verify
    if with_candidates:
        d["chosen"] = step.chosen
        d["candidates"] = step.candidates
    return d


def choice_sentences(res, with_candidates: bool) -> list[dict]:
    return [sentence_info(st, with_candidates) for st in res.steps if st.chosen is not None and st.sentence]


def completion_tokens(res) -> int:
    return sum(st.tokens for st in res.steps if st.chosen is not None)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_object(
    kind: str, rid: str, model: str, results: list, prompt_tokens: int, with_candidates: bool
) -> dict:
    """The whole response of /v1/completions (`kind` "text") or /v1/chat/completions ("chat")."""
    choices = []
    for i, res in enumerate(results):
        c: dict[str, Any] = {
            "index": i,
            "finish_reason": FINISH.get(res.stop_reason, "stop"),
            "stop_reason": res.stop_reason,
            "sentences": choice_sentences(res, with_candidates),
            "timings": res.timings,
        }
        if kind == "chat":
            c["message"] = {"role": "assistant", "content": res.text}
        else:
            c.update(text="".join(" " + s for s in res.sentences), logprobs=None)
        choices.append(c)
    done = sum(completion_tokens(r) for r in results)
    return {
        "id": rid,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, done),
    }


def usage(prompt_tokens: int, completion: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def chunk(
    kind: str,
    rid: str,
    model: str,
    created: int,
    index: int,
    delta: str | None,
    finish: str | None = None,
    extra: dict | None = None,
    role: bool = False,
) -> dict:
    """One streamed chunk: a sentence's text delta, or (delta None) a choice's final chunk."""
    if kind == "chat":
        d: dict[str, Any] = {}
        if role:
            d["role"] = "assistant"
        if delta is not None:
            d["content"] = delta
        c: dict[str, Any] = {"index": index, "delta": d, "finish_reason": finish, "logprobs": None}
    else:
        c = {"index": index, "text": delta or "", "finish_reason": finish, "logprobs": None}
    c.update(extra or {})
    return {
        "id": rid,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [c],
    }
