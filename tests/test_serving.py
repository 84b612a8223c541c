"""Serving the way people consume language models: the OpenAI-compatible API through
the official `openai` client against a live `09_server.py`, plan control in the Python API, the
REPL and the server, the code browser, /metrics, and the web page in a headless Chromium."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import ROOT, free_port, no_eos, run_script, tiny_generator, wait_healthy

from next_speed.core.errors import ConfigError
from next_speed.generation.generate import check_plan

ENV = {
    "EMB_MODEL": "cache/tiny/encoder",
    "DEVICE": "cpu",
    "MAX_NEW_TOKENS": "8",
    "N_CAND": "3",
    "REPEAT_COS": "1.01",
    "PLANS": "1",
    "UNPLANNED": "0",
}
PROMPT = "Paris is the capital of France. It lies on the Seine."


@pytest.fixture(scope="module")
def sgen(tiny_run):
    """The module's generator; the module runs in the tiny run's folder (the code browser reads its
    files on first use)."""
    old = os.getcwd()
    os.chdir(tiny_run)
    try:
        yield tiny_generator(tiny_run, **ENV)
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def server(tiny_run):
    """A live `09_server.py` on loopback over the tiny run's artifacts; yields its base URL."""
    port = free_port()
    env = {**os.environ, **ENV, "PORT": str(port), "MAX_BODY_BYTES": "4096", "PYTHONPATH": f"{ROOT}/src:{ROOT}"}
    log = open(tiny_run / f"server-{port}.log", "w")  # noqa: SIM115 - the server's log
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "09_server.py")], cwd=tiny_run, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        status = wait_healthy(base, proc)
        assert status == 200, (
            f"server never became healthy (last status {status}): "
            f"{(tiny_run / f'server-{port}.log').read_text()[-2000:]}"
        )
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _client(base):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def _post(base, path, body, raw: bytes | None = None, headers=None):
    req = urllib.request.Request(
        base + path,
        method="POST",
        data=raw if raw is not None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(base, path):
    try:
        with urllib.request.urlopen(base + path, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# ---------------------------------------------------------------------- Python API


def test_check_plan_entries():
    assert check_plan(None, 3, 8) is None
    assert check_plan(
        [[1], None, [1, 2, 3], "An example.", {"example": "Another.", "levels": 2}, {"codes": [4]}], 3, 8
    ) == [[1], None, [1, 2, 3], {"example": "An example.", "levels": 3}, {"example": "Another.", "levels": 2}, [4]]
    bad = [
        ([[8]], "plan[0][0]"),
        ([[1, 2, 3, 4]], "plan[0]"),
        ([[]], "plan[0]"),
        ([[True]], "plan[0][0]"),
        ("x", "plan:"),
        ([{"example": "A.", "levels": 0}], "plan[0].levels"),
        ([{"codes": [1], "example": "A."}], "plan[0]"),
        ([{"nope": 1}], "plan[0]"),
        ([""], "plan[0]"),
        ([3.5], "plan[0]"),
        ([[1.0]], "plan[0][0]"),
    ]
    for plan, where in bad:
        with pytest.raises(ConfigError, match=r"^" + where.replace("[", r"\[").replace("]", r"\]")):
            check_plan(plan, 3, 8)


@pytest.fixture()
def distinct(sgen, monkeypatch):
    """A stand-in decoder whose candidates are distinct sentences of 4 tokens (the loop never stops early)."""

    def render_jobs(jobs):
        for j in jobs:
            j.out = [{"text": f"Sentence {j.seed} number {i} here.", "ended": True, "tokens": 4} for i in range(j.n)]

    monkeypatch.setattr(sgen, "render_jobs", render_jobs)
    return sgen


def test_plan_control_in_the_python_api(distinct):
    sgen = distinct
    K, V = sgen.rvq.K, sgen.rvq.V
    whole = [V - 1] * K
    res = sgen.run(PROMPT, 3, plan=[whole, None, [1]], seed=5)
    assert len(res.steps) == 3
    assert res.steps[0].planned == whole and res.steps[0].pinned == K
    assert res.steps[1].pinned == 0
    assert res.steps[2].planned[0] == 1 and res.steps[2].pinned == 1
    with pytest.raises(ConfigError, match=r"plan: 3 entries for at most 2 sentences"):
        sgen.run(PROMPT, 2, plan=[None, None, [1]])
    for bad, where in (({"codes": "A b."}, r"plan\[0\]\.codes"), ({"codes": None}, r"plan\[0\]\.codes")):
        with pytest.raises(ConfigError, match=where):
            sgen.run(PROMPT, 1, plan=[bad])
    # steering by an example: its codes become the plan
    example = "Cats sleep for most of the day."
    res = sgen.run(PROMPT, 1, plan=[example])
    assert res.steps[0].planned == sgen.codes_of(example)
    res = sgen.run(PROMPT, 1, plan=[{"example": example, "levels": 1}])
    assert res.steps[0].planned[0] == sgen.codes_of(example)[0] and res.steps[0].pinned == 1
    # the same seed and pins give the same text; stream() yields the steps run() returns
    a = sgen.run(PROMPT, 3, plan=[[2]], seed=9)
    streamed = []
    gen = sgen.stream(PROMPT, 3, plan=[[2]], seed=9)
    while True:
        try:
            streamed.append(next(gen))
        except StopIteration as stop:
            b = stop.value
            break
    assert a.text == b.text and [s.sentence for s in streamed] == [s.sentence for s in a.steps]
    with pytest.raises(ConfigError, match=r"plan\[0\]\[0\]"):
        sgen.run(PROMPT, 1, plan=[[V]])


def test_token_budget_and_stop_strings(sgen, distinct):
    res = sgen.run(PROMPT, 4, max_tokens=10, seed=1)  # 4 tokens a sentence: 3 sentences reach the budget
    assert len(res.sentences) == 3 and res.stop_reason == "length"
    seen = []
    real = sgen.render_jobs
    sgen.render_jobs = lambda jobs: (seen.extend(j.params.max_new_tokens for j in jobs), real(jobs))
    sgen.run(PROMPT, 4, max_tokens=10, seed=1)
    assert seen == [8, 6, 2]  # the last sentence may only use what is left (MAX_NEW_TOKENS=8 here)
    sgen.render_jobs = real
    free = sgen.run(PROMPT, 3, seed=2)
    cut = sgen.run(PROMPT, 3, seed=2, stop=["number"])
    assert cut.stop_reason == "stop" and cut.sentences == [
        free.sentences[0][: free.sentences[0].find("number")].rstrip()
    ]
    span = sgen.run(PROMPT, 3, seed=2, stop=["here. Sentence"])  # stop strings match within a sentence
    assert span.stop_reason == "steps" and span.text == free.text
    with pytest.raises(ConfigError, match="max_tokens"):
        sgen.run(PROMPT, 1, max_tokens=0)
    with pytest.raises(ConfigError, match="stop"):
        sgen.run(PROMPT, 1, stop=["a", "b", "c", "d", "e"])


def test_repl_plan_commands_and_code_browser(sgen):
    from next_speed.serving.chat import chat_loop

    V = sgen.rvq.V
    inp = io.StringIO(
        f"/pin 1 ; - \n/steer levels=1 Cats sleep a lot.\n/plan\n/pin {V}\n/code 0 1\n/code 0 {V}\n/codes Hello "
        "there.\n"
        f"{PROMPT}\n/plan\n/quit\n"
    )
    out = io.StringIO()
    assert chat_loop(sgen, inp, out, interactive=False) == 0
    text = out.getvalue()
    assert "pinned for the next turn: [[1], None]" in text
    assert "steering sentence 3 by the example's first 1 levels" in text
    assert f"error: pin[3][0]: code {V} is not a code of level 0" in text
    assert "level 0, code 1:" in text and "training sentences" in text
    assert f"error: index: {V} is not a code" in text
    assert "(no pins: the planner chooses)" in text  # pins apply to one turn
    info = sgen.browser().lookup(0, 1, n=3)
    assert info["count"] == int((sgen.browser().codes[:, 0] == 1).sum())
    assert all(ex["codes"][0] == 1 for ex in info["examples"])


# ---------------------------------------------------------------------- the live server


def test_openai_client_completions(server):
    import openai

    client = _client(server)
    models = client.models.list()
    assert [m.id for m in models.data] == ["next-speed"]
    K = models.data[0].model_extra["next_speed"]["K"]
    V = models.data[0].model_extra["next_speed"]["V"]
    pin = [V - 1] * K
    c = client.completions.create(
        model="next-speed", prompt=PROMPT, seed=4, extra_body={"max_sentences": 2, "plan": [pin, [0]]}
    )
    assert c.object == "text_completion" and len(c.choices) == 1
    ch = c.choices[0]
    assert ch.finish_reason in ("stop", "length") and isinstance(ch.text, str)
    sents = ch.model_extra["sentences"]
    assert sents and sents[0]["planned"] == pin and sents[0]["pinned"] == K  # the pinned plan is the plan
    assert len(sents) < 2 or (sents[1]["planned"][0] == 0 and sents[1]["pinned"] == 1)
    assert ch.text == "".join(" " + s["text"] for s in sents)
    assert c.usage.completion_tokens == sum(s["tokens"] for s in sents) and c.usage.prompt_tokens > 0
    # the answer is the one the OpenAPI schema documents (serving/protocol.py)
    from next_speed.serving.protocol import CompletionResponse

    CompletionResponse.model_validate(c.model_dump())
    # streamed: one event per sentence, then the final chunk with finish_reason and usage
    chunks = list(
        client.completions.create(
            model="next-speed",
            prompt=PROMPT,
            seed=4,
            stream=True,
            extra_body={"max_sentences": 2, "plan": [pin, [0]], "return_candidates": True},
        )
    )
    deltas = [x.choices[0].text for x in chunks if x.choices[0].finish_reason is None]
    assert "".join(deltas) == ch.text and len(deltas) == len(sents)
    last = chunks[-1]
    assert (
        last.choices[0].finish_reason == ch.finish_reason and last.usage.completion_tokens == c.usage.completion_tokens
    )
    first = chunks[0].choices[0].model_extra["sentence"]
    assert (
        first["planned"] == pin
        and len(first["candidates"]) == 3
        and {"codes", "prefix", "cosine"} <= set(first["candidates"][0])
    )
    # n choices, each seeded seed + i: choice 1 equals a single request with seed + 1
    two = client.completions.create(model="next-speed", prompt=PROMPT, seed=4, n=2, max_tokens=12)
    one = client.completions.create(model="next-speed", prompt=PROMPT, seed=5, max_tokens=12)
    assert [x.index for x in two.choices] == [0, 1] and two.choices[1].text == one.choices[0].text
    assert sum(s["tokens"] for s in one.choices[0].model_extra["sentences"]) <= 12
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=PROMPT)
    with pytest.raises(openai.BadRequestError, match=r"plan\[0\]\[0\]"):
        client.completions.create(model="next-speed", prompt=PROMPT, extra_body={"plan": [[V]]})
    with pytest.raises(openai.BadRequestError, match="plan_deep"):
        client.completions.create(model="next-speed", prompt=PROMPT, extra_body={"plan_deep": "median"})
    levels = client.completions.create(
        model="next-speed", prompt=PROMPT, seed=4, max_tokens=12, extra_body={"plan_deep": "levels"}
    )
    assert levels.choices[0].text
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="next-speed", prompt=PROMPT, logprobs=2)


def test_openai_client_chat(server):
    client = _client(server)
    msgs = [{"role": "system", "content": "Continue the text."}, {"role": "user", "content": PROMPT}]
    r = client.chat.completions.create(model="next-speed", messages=msgs, seed=3, extra_body={"max_sentences": 2})
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    content = r.choices[0].message.content
    assert content == " ".join(s["text"] for s in r.choices[0].model_extra["sentences"])
    from next_speed.serving.protocol import ChatCompletionResponse

    ChatCompletionResponse.model_validate(r.model_dump())
    stream = list(
        client.chat.completions.create(
            model="next-speed", messages=msgs, seed=3, stream=True, extra_body={"max_sentences": 2}
        )
    )
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(x.choices[0].delta.content or "" for x in stream) == content
    assert (
        stream[-1].choices[0].finish_reason == r.choices[0].finish_reason
        and stream[-1].usage.total_tokens == r.usage.total_tokens
    )
    # steering by example from the API: the example's codes are the plan
    ex = "Rivers flow toward an ocean or a lake."
    status, enc = _post(server, "/v1/codes/encode", {"text": ex})
    assert status == 200
    r = client.chat.completions.create(model="next-speed", messages=msgs, extra_body={"max_sentences": 1, "plan": [ex]})
    assert r.choices[0].model_extra["sentences"][0]["planned"] == enc["codes"]


def test_bad_requests_get_the_error_envelope_and_the_server_keeps_serving(server):
    ok = {"model": "next-speed", "prompt": PROMPT, "max_sentences": 1}
    cases = [
        ("/v1/completions", {**ok, "prompt": 5}, 400, "prompt"),
        ("/v1/completions", {**ok, "max_tokens": "10"}, 400, "max_tokens"),
        ("/v1/completions", {**ok, "temperature": 3}, 400, "temperature"),
        ("/v1/completions", {**ok, "n": 99}, 400, "n"),
        ("/v1/completions", {**ok, "n_cand": 1000}, 400, "n_cand"),
        ("/v1/completions", {**ok, "max_sentences": 99}, 400, "max_sentences"),
        ("/v1/completions", {**ok, "plan": [[999]]}, 400, "plan[0][0]"),
        ("/v1/completions", {**ok, "plan": "x"}, 400, "plan"),
        ("/v1/completions", {**ok, "plan": [{"example": "A b.", "levels": 99}]}, 400, "plan[0].levels"),
        ("/v1/completions", {**ok, "stop": ["a"] * 5}, 400, "stop"),
        ("/v1/completions", {**ok, "wat": 1}, 400, "wat"),
        ("/v1/completions", {**ok, "prompt": ["a", "b"]}, 400, "prompt"),
        ("/v1/completions", {**ok, "prompt": "  "}, 400, "prompt"),
        ("/v1/completions", {**ok, "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {**ok, "model": "nope"}, 404, "model"),
        ("/v1/chat/completions", {"model": "next-speed", "messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": "next-speed", "messages": [{"role": "robot", "content": "Hi."}]},
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            {"model": "next-speed", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            "messages",
        ),
        ("/v1/codes/encode", {"text": 3}, 400, "text"),
        ("/v1/completions", {**ok, "plan": [{"codes": "A b."}]}, 400, "plan[0].codes"),
        ("/v1/completions", {**ok, "plan": [None, None]}, 400, "plan"),
        ("/v1/completions", {**ok, "temperature": 0.001}, 400, "temperature"),
        ("/v1/completions", {**ok, "stream": True, "n_cand": "4"}, 400, "n_cand"),
        ("/v1/completions", {**ok, "stream": True, "plan": [[999]]}, 400, "plan[0][0]"),
        ("/v1/completions", {**ok, "stream_options": {"nope": 1}}, 400, "stream_options.nope"),
        (
            "/v1/chat/completions",
            {"model": "next-speed", "messages": [{"role": "user", "content": "Hi.", "tool_calls": []}]},
            400,
            "messages[0].tool_calls",
        ),
    ]
    for path, body, status, param in cases:
        got, err = _post(server, path, body)
        assert got == status, (path, body, err)
        assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"], err
        assert (err["error"]["param"] or "").startswith(param), (body, err)
    got, err = _post(server, "/v1/completions", None, raw=b'{"model": ')
    assert got == 400 and "invalid JSON" in err["error"]["message"]
    got, err = _post(server, "/v1/completions", {**ok, "prompt": "x" * 5000})  # MAX_BODY_BYTES=4096 in this server
    assert got == 413 and "MAX_BODY_BYTES" in err["error"]["message"]
    for path in ("/v1/chat/completions", "/v1/codes/encode"):
        got, err = _post(server, path, {"text": "x" * 5000})
        assert got == 413 and err["error"]["type"] == "invalid_request_error", (path, err)
    got, err = _post(server, "/generate", {"prompt": "x" * 5000})
    assert got == 413 and "MAX_BODY_BYTES" in err["error"]  # the spec's endpoint keeps its own error shape
    for path, status in (
        ("/v1/codes/0/9999", 404),
        ("/v1/codes/99/0", 404),
        ("/v1/codes/x/1", 400),
        ("/v1/codes/0/1?n=0", 400),
        ("/v1/models/other", 404),
        ("/v1/nothing", 404),
    ):
        got, text = _get(server, path)
        assert got == status and "error" in json.loads(text), (path, text)
    assert _get(server, "/health")[0] == 200
    assert _post(server, "/v1/completions", ok)[0] == 200


def test_code_browser_and_metrics(server):
    status, text = _get(server, "/v1/codes/0/1?n=3&neighbours=2")
    info = json.loads(text)
    assert status == 200 and info["level"] == 0 and info["index"] == 1 and len(info["neighbours"]) == 2
    assert all(ex["codes"][0] == 1 for ex in info["examples"]) and len(info["examples"]) == min(3, info["count"])
    from prometheus_client.parser import text_string_to_metric_families

    def scrape():
        status, text = _get(server, "/metrics")
        assert status == 200
        fams = {f.name: f for f in text_string_to_metric_families(text)}

        def total(name, **lab):
            return sum(
                x.value
                for x in fams[name].samples
                if x.name == name + "_total"  # noqa: E731
                and all(x.labels.get(k) == v for k, v in lab.items())
            )

        return fams, total

    _, before = scrape()
    status, body = _post(server, "/generate", {"prompt": PROMPT, "max_sentences": 1, "plan": [[1]]})
    assert status == 200 and len(body["sentences"]) == 1 and body["planned"][0][0] == 1
    assert _post(server, "/generate", {"prompt": 5})[0] == 422
    fams, after = scrape()
    assert {
        "nextspeed_requests",
        "nextspeed_errors",
        "nextspeed_sentences",
        "nextspeed_tokens",
        "nextspeed_queue_length",
        "nextspeed_stage_seconds",
    } <= set(fams)
    assert (
        after("nextspeed_requests", endpoint="/generate", status="200")
        == before("nextspeed_requests", endpoint="/generate", status="200") + 1
    )
    assert (
        after("nextspeed_errors", endpoint="/generate", status="422")
        == before("nextspeed_errors", endpoint="/generate", status="422") + 1
    )
    assert after("nextspeed_sentences") >= before("nextspeed_sentences") + 1
    assert after("nextspeed_tokens") > before("nextspeed_tokens")
    assert [x.value for x in fams["nextspeed_queue_length"].samples] == [0.0]
    stages = {x.labels["stage"] for x in fams["nextspeed_stage_seconds"].samples if "stage" in x.labels}
    assert {"planner", "decoder", "rerank", "queued", "total"} <= stages


def _chromium():
    chrome, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chrome and driver):
        pytest.skip("the browser test needs Debian's chromium and chromium-driver (test.sh installs them where it can)")
    return chrome, driver


@pytest.mark.integration
def test_web_page_in_headless_chromium(server):
    """Load the page, generate (streamed), open a sentence's candidates, browse a code; keep a
    screenshot at out/web_page.png."""
    chrome, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400", "--disable-gpu"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        drv.get(server + "/")
        wait = WebDriverWait(drv, 120)
        wait.until(lambda d: "model next-speed" in d.find_element(By.ID, "status").text)
        drv.find_element(By.ID, "max_sentences").clear()
        drv.find_element(By.ID, "max_sentences").send_keys("2")
        drv.find_element(By.ID, "pins").send_keys("1")  # pin level 0 of the first sentence to code 1
        drv.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith(("done", "error")))
        assert drv.find_element(By.ID, "status").text.startswith("done"), drv.find_element(By.ID, "status").text
        rows = drv.find_elements(By.CSS_SELECTOR, "tr.sentence-row")
        assert (
            rows
            and rows[0].find_elements(By.CSS_SELECTOR, "td")[2].find_elements(By.CSS_SELECTOR, ".code")[0].text == "1"
        )
        assert rows[0].find_elements(By.CSS_SELECTOR, ".code.pinned")  # the pinned level is marked
        assert len(drv.find_elements(By.CSS_SELECTOR, "#output .sentence")) == len(rows)
        rows[0].find_element(By.CSS_SELECTOR, "button.show-cands").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "table.cand-table tr.chosen"))
        rows[0].find_elements(By.CSS_SELECTOR, ".code")[0].click()  # the code browser
        wait.until(lambda d: "carried by" in d.find_element(By.ID, "browser").text)
        # plan ahead: the page's PARALLEL control; the drafts stream in order like any sentence
        from selenium.webdriver.support.ui import Select

        Select(drv.find_element(By.ID, "parallel")).select_by_value("2")
        drv.find_element(By.ID, "pins").clear()
        drv.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith(("done", "error")))
        assert drv.find_element(By.ID, "status").text.startswith("done"), drv.find_element(By.ID, "status").text
        assert drv.find_elements(By.CSS_SELECTOR, "tr.sentence-row")
        out = ROOT / "out"
        out.mkdir(exist_ok=True)
        assert drv.save_screenshot(str(out / "web_page.png"))
        assert (out / "web_page.png").stat().st_size > 10_000
        logs = [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]
        assert not logs, logs
    finally:
        drv.quit()


def test_v1_queue_full_and_a_gone_client_frees_its_work(sgen):
    """In process: over MAX_QUEUE an immediate 503 in the envelope with Retry-After; a client
    that disconnects mid-stream cancels its generation."""
    import threading

    from fastapi.testclient import TestClient

    from next_speed.serving.server import ServerConfig, create_app

    app = create_app(lambda: sgen, ServerConfig(max_queue=1, retry_after=3), background=False)
    body = {"model": "next-speed", "prompt": PROMPT, "max_sentences": 1}
    with TestClient(app) as c:
        sched = app.state.server.sched
        out = {}
        with sgen._lock:  # the worker cannot render: the first request stays in flight
            t = threading.Thread(target=lambda: out.setdefault("r", c.post("/v1/completions", json=body)))
            t.start()
            deadline = time.time() + 30
            while sched.load() < 1 and time.time() < deadline:
                time.sleep(0.05)
            r = c.post("/v1/completions", json={**body, "stream": True})
            assert r.status_code == 503 and r.headers["retry-after"] == "3"
            assert r.json()["error"]["type"] == "server_error" and "MAX_QUEUE" in r.json()["error"]["message"]
        t.join(timeout=120)
        assert out["r"].status_code == 200
        # a streamed request whose client leaves after the first event: its generation is cancelled
        with c.stream("POST", "/v1/completions", json={**body, "max_sentences": 8, "stream": True}) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    break
        deadline = time.time() + 60
        while sched.load() and time.time() < deadline:
            time.sleep(0.1)
        assert sched.load() == 0


# ---------------------------------------------------------------------- the REPL, the server and its scheduler


@pytest.mark.slow
def test_api_one_liner_and_chat_oneshot(in_run):
    # REPEAT_COS off: the random-init stand-in encoder puts every sentence near every other; one
    # plan per step (the tests of several plans ask for them)
    env = {
        "EMB_MODEL": "cache/tiny/encoder",
        "DEVICE": "cpu",
        "MAX_NEW_TOKENS": "8",
        "REPEAT_COS": "1.01",
        "PLANS": "1",
        "UNPLANNED": "0",
    }
    code = (
        "import json; from infer import SentenceGenerator; g=SentenceGenerator(); "
        "print(json.dumps(g.generate('Paris is the capital of France.', 2)))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=in_run,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env, "PYTHONPATH": f"{ROOT}/src:{ROOT}"},
    )
    assert r.returncode == 0, r.stderr
    text = json.loads(r.stdout)  # the one-liner returns the text: two sentences after the prompt
    assert isinstance(text, str) and text.strip() and not text.startswith("Paris is the capital")
    r = run_script("08_chat.py", "-p", "Paris is the capital of France.", env=env, cwd=in_run, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_chat_scripted_session(gen):
    from next_speed.serving.chat import chat_loop

    inp = io.StringIO(
        "/show\n/set n_cand=2\n/set bogus=1\nParis is the capital of France.\n/reset\n/quit\nnever read\n"
    )
    out = io.StringIO()
    assert chat_loop(gen, inp, out, interactive=False) == 0
    text = out.getvalue()
    assert "n_cand=3" in text and "n_cand=2" in text and "unknown parameter 'bogus'" in text
    assert "(conversation cleared)" in text and "never read" not in text


def test_server_in_process(gen):
    from fastapi.testclient import TestClient

    from next_speed.serving.server import ServerConfig, create_app

    app = create_app(lambda: gen, ServerConfig(max_prompt_chars=200, max_sentences_cap=3), background=False)
    with TestClient(app) as c:
        h = c.get("/health")
        assert h.status_code == 200 and h.json() == {"status": "ok", "device": "cpu", "dtype": "fp32"}
        r = c.post(
            "/generate",
            json={"prompt": "Paris is the capital of France.", "max_sentences": 2, "params": {"rerank": True}},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert {"text", "sentences", "planned", "realized", "stop_reason"} <= set(body)
        assert len(body["planned"]) == len(body["realized"]) == len(body["sentences"])
        assert body["stop_reason"] in ("steps", "empty", "repeat") and (
            body["stop_reason"] != "steps" or len(body["sentences"]) == 2
        )
        bad = [
            ({"prompt": "", "max_sentences": 1}, 422),
            ({"prompt": "x" * 500}, 413),
            ({"prompt": "Hi there.", "max_sentences": 9}, 422),
            ({"prompt": "Hi there.", "params": {"temp": 0}}, 422),
            ({"prompt": "Hi there.", "params": {"top_p": 2}}, 422),
            ({"prompt": "Hi there.", "params": {"n_cand": 100}}, 422),
            ({"prompt": "Hi there.", "params": {"nope": 1}}, 422),
            ({"max_sentences": 1}, 422),
            ({"prompt": "Hi there.", "params": {"gen_steps": 2}}, 422),
            ({"prompt": 5}, 422),
            ({"prompt": "Hi there.", "params": {"n_cand": "many"}}, 422),
            # every value typed and capped, whatever its JSON type
            ({"prompt": "Hi there.", "params": {"n_cand": "30"}}, 422),
            ({"prompt": "Hi there.", "params": {"max_new_tokens": "500"}}, 422),
            ({"prompt": "Hi there.", "params": {"n_cand": 17}}, 422),
            ({"prompt": "Hi there.", "params": {"max_new_tokens": 129}}, 422),
            ({"prompt": "Hi there.", "params": {"n_cand": True}}, 422),
            ({"prompt": "Hi there.", "max_sentences": True}, 422),
            ({"prompt": "Hi there.", "params": {"n_cand": 2.5}}, 422),
            ({"prompt": "Hi there.", "params": {"seed": 2**70}}, 422),
            ({"prompt": "Hi there.", "params": {"seed": -1}}, 422),
            ({"prompt": "Hi there.", "params": {"rerank": "yes"}}, 422),
            ({"prompt": "   "}, 422),
            ({"prompt": "Hi\x00 there."}, 422),
            ({"prompt": "Hi there.", "extra": 1}, 422),
        ]
        for payload, status in bad:
            r = c.post("/generate", json=payload)
            assert r.status_code == status, (payload, r.text)
            assert "error" in r.json()
        msg = c.post("/generate", json={"prompt": "Hi there.", "params": {"n_cand": 17}}).json()["error"]
        assert msg.startswith("params.n_cand:") and "MAX_N_CAND" in msg
        # NaN and infinity are not JSON, but Python's json module writes them: refused, not a 500
        for raw in (
            b'{"prompt": "Hi there.", "params": {"temp": NaN}}',
            b'{"prompt": "Hi there.", "params": {"top_p": Infinity}}',
        ):
            r = c.post("/generate", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 422 and "params." in r.json()["error"], r.text
        ok = c.post(
            "/generate",
            json={"prompt": "Hi there.", "max_sentences": 1, "params": {"temp": 1, "n_cand": 2, "seed": 2**32 - 1}},
        )
        assert ok.status_code == 200, ok.text
        r = c.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422 and "error" in r.json()


def test_server_unexpected_error_is_json_and_it_keeps_serving(gen, monkeypatch):
    from fastapi.testclient import TestClient

    from next_speed.serving.server import create_app

    app = create_app(lambda: gen, background=False)
    real = gen.engine.prefill  # every decoder path (the open batch, the one-by-one retry) prefills
    monkeypatch.setattr(gen.engine, "prefill", lambda jobs: (_ for _ in ()).throw(RuntimeError("boom")))
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/generate", json={"prompt": "Hi there."})
        assert r.status_code == 500 and r.json()["error"].startswith("internal error (RuntimeError)")
        monkeypatch.setattr(gen.engine, "prefill", real)
        assert c.get("/health").status_code == 200
        assert c.post("/generate", json={"prompt": "Hi there.", "max_sentences": 1}).status_code == 200


def test_server_health_503_while_loading():
    import threading

    from fastapi.testclient import TestClient

    from next_speed.serving.server import create_app

    release = threading.Event()
    app = create_app(lambda: release.wait(30) and None, background=True)
    with TestClient(app) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["error"] == "loading models"
        assert c.post("/generate", json={"prompt": "Hi there."}).status_code == 503
        release.set()


@pytest.mark.slow
def test_real_server_command(in_run):
    port = free_port()
    env = {
        **os.environ,
        "EMB_MODEL": "cache/tiny/encoder",
        "DEVICE": "cpu",
        "PORT": str(port),
        "MAX_NEW_TOKENS": "8",
        "PYTHONPATH": f"{ROOT}/src:{ROOT}",
    }
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "09_server.py")],
        cwd=in_run,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        status = wait_healthy(f"http://127.0.0.1:{port}", proc)
        assert status == 200, f"server never became healthy (last status {status})"
        # a client that disconnects mid-request does not take the server down
        body = json.dumps({"prompt": "Paris is the capital of France.", "max_sentences": 2}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/generate",
            method="POST",
            data=json.dumps(
                {"prompt": "Paris is the capital of France.", "max_sentences": 2, "params": {"rerank": True}}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            body = json.loads(r.read())
        assert r.status == 200 and "text" in body and "planned" in body
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_server_batches_concurrent_requests(gen):
    """Concurrent requests share decoder batches and get what the same requests get one by one."""
    from fastapi.testclient import TestClient

    from next_speed.serving.server import ServerConfig, create_app

    payloads = [
        {"prompt": "Paris is the capital of France.", "max_sentences": 2, "params": {"seed": s, "n_cand": n}}
        for s, n in [(1, 2), (2, 3), (3, 1), (4, 2)]
    ]
    # a request whose steps render two plans and an unplanned candidate: the decoder's jobs of a step join
    # the batch, the base model's is rendered apart, the step ends with the last
    payloads.append(
        {
            "prompt": "Paris is the capital of France.",
            "max_sentences": 2,
            "params": {"seed": 5, "n_cand": 2, "plans": 2, "plan_temp": 1.0, "unplanned": 1},
        }
    )
    alone = [gen.run(p["prompt"], p["max_sentences"], **p["params"]) for p in payloads]
    app = create_app(lambda: gen, ServerConfig(max_queue=8), background=False)
    with TestClient(app) as c:
        sched = app.state.server.sched
        with gen._lock:  # the worker waits, so the requests pile up and share batches from their first steps on
            threads, out = _post_all(c, payloads)
            deadline = time.time() + 30
            while sched.load() < len(payloads) and time.time() < deadline:
                time.sleep(0.05)
        for t in threads:
            t.join(timeout=300)
    assert all(r.status_code == 200 for r in out), [r.text for r in out]
    assert [r.json()["sentences"] for r in out] == [a.sentences for a in alone]
    assert [r.json()["planned"] for r in out] == [a.planned for a in alone]
    assert all("queued" in r.json()["timings"] for r in out)
    assert sched.rows / sched.batches > 3  # rows of several requests per batch (one request has at most 3)


def test_server_queue_limit(gen):
    """Over MAX_QUEUE requests in flight: an immediate 503, a JSON error and Retry-After; /health stays instant."""
    from fastapi.testclient import TestClient

    from next_speed.serving.server import ServerConfig, create_app

    app = create_app(lambda: gen, ServerConfig(max_queue=1, retry_after=3), background=False)
    with TestClient(app) as c:
        sched = app.state.server.sched
        with gen._lock:
            threads, out = _post_all(c, [{"prompt": "Paris is the capital of France.", "max_sentences": 1}])
            deadline = time.time() + 30
            while sched.load() < 1 and time.time() < deadline:
                time.sleep(0.05)
            t0 = time.time()
            r = c.post("/generate", json={"prompt": "Hi there.", "max_sentences": 1})
            assert r.status_code == 503 and r.headers["retry-after"] == "3" and "MAX_QUEUE" in r.json()["error"]
            assert c.get("/health").status_code == 200 and time.time() - t0 < 5
        threads[0].join(timeout=300)
    assert out[0].status_code == 200, out[0].text


def test_scheduler_survives_cancelled_requests(gen):
    """A client that goes away cancels its future; the worker drops the request and keeps serving."""
    from next_speed.serving.scheduler import BatchScheduler

    sched = BatchScheduler(gen, max_queue=4)
    try:
        with gen._lock:
            gone = sched.submit("Paris is the capital of France.", 2, seed=1)
            kept = sched.submit("Paris is the capital of France.", 1, seed=2)
            assert gone.cancel()
        assert kept.result(timeout=300).sentences == gen.run("Paris is the capital of France.", 1, seed=2).sentences
        assert sched.submit("Hi there.", 1).result(timeout=300) is not None and sched.load() == 0
    finally:
        sched.close()


def test_scheduler_short_step_does_not_wait_for_a_long_one(gen, monkeypatch):
    """Iteration-level scheduling: a request whose sentence ends after 2 tokens is answered while
    an earlier request's long sentence is still being written, not when the whole batch ends."""
    from next_speed.serving.scheduler import BatchScheduler

    no_eos(gen, monkeypatch)
    monkeypatch.setattr(gen.engine, "_stop_set", set())  # sentences end at their token limit only
    events = []
    sched = BatchScheduler(gen, max_queue=4)
    try:
        with gen._lock:  # both wait, so they join the same first batch
            # retries=0: sentences cut off by the token limit are kept at once (no re-planned step)
            long = sched.submit(
                "Paris is the capital of France.",
                1,
                seed=1,
                n_cand=2,
                max_new_tokens=24,
                retries=0,
                on_step=lambda st: events.append("long"),
            )
            short = sched.submit(
                "Paris is the capital of France.",
                1,
                seed=2,
                n_cand=2,
                max_new_tokens=2,
                retries=0,
                on_step=lambda st: events.append("short"),
            )
        long.result(timeout=300), short.result(timeout=300)
    finally:
        sched.close()
    assert events == ["short", "long"]
    assert sched.batches >= 24 and sched.rows / sched.batches < 4  # the short one's rows left early


def test_scheduler_recovers_from_a_failed_decoder_round(gen, monkeypatch):
    """A decoder round that fails mid-sentence (an out-of-memory, say) drops the open batch; each
    request's step is rendered again alone from its seed, so every answer is what it is alone."""
    from next_speed.generation.engine import DecodeBatch
    from next_speed.serving.scheduler import BatchScheduler

    reqs = [("Paris is the capital of France.", 2, 1, 2), ("The Amazon is the largest rainforest on Earth.", 1, 2, 3)]
    alone = [gen.run(p, m, seed=s, n_cand=n).sentences for p, m, s, n in reqs]
    real, calls = DecodeBatch.step, [0]

    def flaky(self):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("out of memory")
        return real(self)

    monkeypatch.setattr(DecodeBatch, "step", flaky)
    sched = BatchScheduler(gen, max_queue=4)
    try:
        with gen._lock:
            futs = [sched.submit(p, m, seed=s, n_cand=n) for p, m, s, n in reqs]
        got = [f.result(timeout=300).sentences for f in futs]
    finally:
        sched.close()
    assert calls[0] > 3 and got == alone


def _post_all(client, payloads):
    import threading

    out = [None] * len(payloads)

    def post(i):
        out[i] = client.post("/generate", json=payloads[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    return threads, out
