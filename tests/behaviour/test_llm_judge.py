"""LLMJudge through the real openai and anthropic SDKs, against a fake API server on 127.0.0.1.

The server speaks the Chat Completions API (POST /v1/chat/completions) and the Anthropic Messages API
(POST /v1/messages). It grades with a trivial oracle read off the prompt, and misbehaves on purpose for
responses containing a marker: ALWAYS500 (HTTP 500 every time), ONCE500 (HTTP 500 on the first call
for that prompt only), GARBLE (a reply with no YES/NO).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mechintro.behaviour.judges import (
    JUDGE_SYSTEM,
    Judge,
    LLMJudge,
    LLMJudgeConfig,
    MissingAPIKeyError,
    Verdict,
)

BODY = re.compile(r"<(?:reply|continuation)>\n(.*)\n</(?:reply|continuation)>", re.DOTALL)
CONCEPT = re.compile(r'The concept that (?:may have been|was) added is "([^"]+)"')


def oracle(prompt: str) -> str:
    """The fake judge model: YES when the reply starts with "Yes" (detection) / names the concept."""
    response = BODY.search(prompt).group(1)
    if "GARBLE" in response:
        return "I cannot decide."
    if prompt.startswith("Grading task: DETECTION"):
        yes = response.startswith("Yes")
    else:
        yes = CONCEPT.search(prompt).group(1).lower() in response.lower()
    return f"Reasoning goes here.\nAnswer: {'YES' if yes else 'NO'}"


class FakeAPI:
    """A threaded HTTP server on a random loopback port, recording every request."""

    def __init__(self, delay_s: float = 0.0):
        self.requests: list[dict] = []
        self.calls_per_prompt: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay_s = delay_s
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with api.lock:
                    api.in_flight += 1
                    api.max_in_flight = max(api.max_in_flight, api.in_flight)
                try:
                    time.sleep(api.delay_s)
                    status, payload = api.answer(self.path, dict(self.headers), body)
                finally:
                    with api.lock:
                        api.in_flight -= 1
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def answer(self, path: str, headers: dict, body: dict) -> tuple[int, dict]:
        """Route one request; return (HTTP status, JSON payload)."""
        if path == "/v1/chat/completions":
            system = body["messages"][0]["content"]
            prompt = body["messages"][-1]["content"]
        elif path == "/v1/messages":
            system, prompt = body["system"], body["messages"][-1]["content"]
        else:
            return 404, {"error": {"message": f"no route {path}"}}
        with self.lock:
            self.requests.append({"path": path, "headers": headers, "body": body})
            self.calls_per_prompt[prompt] += 1
            n_calls = self.calls_per_prompt[prompt]
        assert system == JUDGE_SYSTEM and body.get("temperature") == 0
        response = BODY.search(prompt).group(1)
        if "ALWAYS500" in response or ("ONCE500" in response and n_calls == 1):
            return 500, {"error": {"message": "internal error", "type": "server_error"}}
        text = oracle(prompt)
        if path == "/v1/chat/completions":
            return 200, {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        return 200, {
            "id": "msg_test",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 1},
        }

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    """Keep proxies out of the way and provide fake keys."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-openai")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-anthropic")


@pytest.fixture
def api():
    with FakeAPI() as server:
        yield server


def make_judge(api: FakeAPI, backend: str, cache_dir, **settings) -> LLMJudge:
    base_url = f"{api.url}/v1" if backend == "openai" else api.url
    defaults = dict(
        backend=backend,
        base_url=base_url,
        cache_dir=cache_dir,
        max_retries=2,
        backoff_s=0.001,
        timeout_s=10.0,
    )
    return LLMJudge(**{**defaults, **settings})


ROWS = [
    # (response, concept, forced, expected verdict)
    (
        "Yes, I detect an injected thought. The thought is about Bread.",
        "Bread",
        False,
        Verdict(True, True, None),
    ),
    (
        "Yes, I detect an injected thought. The thought is about Oceans.",
        "Bread",
        False,
        Verdict(True, False, None),
    ),
    ("No, I do not detect an injected thought.", "Bread", False, Verdict(False, False, None)),
    (" Bread.", "Bread", True, Verdict(None, None, True)),
    (" Oceans.", "Bread", True, Verdict(None, None, False)),
    ("Yes, ONCE500 bread.", "Bread", False, Verdict(True, True, None)),  # recovered by a retry
]


def run_rows(judge: LLMJudge, rows=ROWS) -> list[Verdict]:
    return judge.judge(
        responses=[r[0] for r in rows], concepts=[r[1] for r in rows], forced=[r[2] for r in rows]
    )


@pytest.mark.parametrize("backend", ["openai", "anthropic"])
def test_verdicts_through_the_sdk(api, tmp_path, backend):
    judge = make_judge(api, backend, tmp_path / "cache")
    assert isinstance(judge, Judge)
    assert run_rows(judge) == [r[3] for r in ROWS]
    expected_path = "/v1/chat/completions" if backend == "openai" else "/v1/messages"
    assert {r["path"] for r in api.requests} == {expected_path}
    # 6 first questions + identification of the 3 detected rows + a retry of both ONCE500 questions
    assert len(api.requests) == 6 + 3 + 2
    headers = api.requests[0]["headers"]  # the key travels as Authorization: Bearer or X-Api-Key
    assert any(
        v.endswith(f"sk-test-{backend}")
        for k, v in headers.items()
        if k.lower() in ("authorization", "x-api-key")
    )
    assert api.requests[0]["body"]["model"] == judge.config.resolved_model
    assert judge.name == f"llm:{judge.config.resolved_model}"


@pytest.mark.parametrize("backend", ["openai", "anthropic"])
def test_failures_are_errors_not_no(api, tmp_path, backend):
    judge = make_judge(api, backend, tmp_path / "cache")
    rows = [
        ("Yes, ALWAYS500.", "Bread", False),
        (" ALWAYS500", "Bread", True),
        ("Yes, GARBLE.", "Bread", False),
        ("Yes, it is about bread ALWAYS500", "Bread", False),
    ]
    started = time.perf_counter()
    verdicts = judge.judge(
        responses=[r[0] for r in rows], concepts=[r[1] for r in rows], forced=[r[2] for r in rows]
    )
    assert time.perf_counter() - started < 5
    for v in verdicts:
        assert v.error is not None
        assert v.detected is not False and v.identified is not False and v.forced_identified is not False
    assert verdicts[0] == Verdict(None, None, None, verdicts[0].error)
    assert verdicts[0].error.startswith("detection: InternalServerError")
    assert verdicts[1].error.startswith("forced identification: InternalServerError")
    assert verdicts[2].error.startswith("detection: unparseable judge reply")
    # 1 + max_retries attempts for each always-failing prompt
    always = [p for p in api.calls_per_prompt if "ALWAYS500" in p]
    assert len(always) == 3 and all(api.calls_per_prompt[p] == 3 for p in always)


def test_identification_failure_keeps_detection(api, tmp_path):
    """Detection succeeds; identification fails: detected stays, identified is None, error says which."""

    class HalfBroken(FakeAPI):
        def answer(self, path, headers, body):
            if body["messages"][-1]["content"].startswith("Grading task: IDENTIFICATION"):
                return 500, {"error": {"message": "down"}}
            return super().answer(path, headers, body)

    with HalfBroken() as broken:
        judge = make_judge(broken, "openai", tmp_path / "cache")
        [verdict] = judge.judge(responses=["Yes, bread."], concepts=["Bread"], forced=[False])
    assert verdict.detected is True and verdict.identified is None and verdict.forced_identified is None
    assert verdict.error.startswith("identification: InternalServerError")


@pytest.mark.parametrize("backend", ["openai", "anthropic"])
def test_cache_hit_makes_no_requests(api, tmp_path, backend):
    first = run_rows(make_judge(api, backend, tmp_path / "cache"))
    n_requests = len(api.requests)
    again = run_rows(make_judge(api, backend, tmp_path / "cache"))  # a fresh judge, same cache folder
    assert again == first and len(api.requests) == n_requests
    # another model is another cache key
    run_rows(make_judge(api, backend, tmp_path / "cache", model="other-model"), rows=ROWS[:1])
    assert len(api.requests) > n_requests


def test_failures_are_not_cached(api, tmp_path):
    rows = [("Yes, ALWAYS500.", "Bread", False)]
    run_rows(make_judge(api, "openai", tmp_path / "cache"), rows=rows)
    n_requests = len(api.requests)
    run_rows(make_judge(api, "openai", tmp_path / "cache"), rows=rows)
    assert len(api.requests) == 2 * n_requests


def test_bounded_concurrency(tmp_path):
    with FakeAPI(delay_s=0.05) as slow:
        judge = make_judge(slow, "openai", None, max_concurrency=3)
        rows = [(f"No, reply {i}.", "Bread", False) for i in range(12)]
        verdicts = run_rows(judge, rows=rows)
    assert verdicts == [Verdict(False, False, None)] * 12
    assert 1 < slow.max_in_flight <= 3


@pytest.mark.parametrize(
    ("backend", "env"), [("openai", "OPENAI_API_KEY"), ("anthropic", "ANTHROPIC_API_KEY")]
)
def test_missing_key_fails_at_construction(monkeypatch, backend, env):
    monkeypatch.delenv(env)
    with pytest.raises(MissingAPIKeyError, match=env):
        LLMJudge(backend=backend)
    monkeypatch.setenv("MY_JUDGE_KEY", "")
    with pytest.raises(MissingAPIKeyError, match="MY_JUDGE_KEY"):
        LLMJudge(backend=backend, api_key_env="MY_JUDGE_KEY")
    assert issubclass(MissingAPIKeyError, ValueError)


def test_check_after_key_disappears(monkeypatch):
    judge = LLMJudge()
    assert judge.check() == "sk-test-openai"
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(MissingAPIKeyError, match="OPENAI_API_KEY"):
        judge.check()


def test_config_validation():
    with pytest.raises(ValueError, match=r"valid backends: \['anthropic', 'openai'\]"):
        LLMJudgeConfig(backend="gemini")
    with pytest.raises(TypeError, match="valid settings"):
        LLMJudge(temprature=0)
    config = LLMJudgeConfig(backend="anthropic")
    assert config.resolved_model == "claude-haiku-4-5" and config.resolved_key_env == "ANTHROPIC_API_KEY"
    assert LLMJudge(LLMJudgeConfig(model="gpt-4o")).name == "llm:gpt-4o"
    assert LLMJudge().name == "llm:gpt-4.1-mini"
    assert "sk-test" not in repr(LLMJudge())


def test_bugs_are_raised_not_recorded(api, tmp_path):
    """Only the SDK's API errors become recorded errors; a programming error surfaces."""
    from dataclasses import replace

    def broken(client, config, system, prompt):
        raise TypeError("bad call")

    judge = make_judge(api, "openai", tmp_path / "cache")
    judge._backend = replace(judge._backend, complete=broken)
    with pytest.raises(TypeError, match="bad call"):
        judge.judge(responses=["Yes."], concepts=["Bread"], forced=[False])


class FailingAPI(FakeAPI):
    """The fake API answering 400 (not retried) while ``failing`` is set."""

    failing = True

    def answer(self, path, headers, body):
        if self.failing:
            return 400, {"error": {"message": "bad request", "type": "invalid_request_error"}}
        return super().answer(path, headers, body)


def test_failed_judging_exits_non_zero_then_rejudge_and_reruns_fix_it(
    tiny_dir, tmp_path, monkeypatch, capsys
):
    """Through the command line: a run whose every judge call fails exits 1 (the errors are stored, not
    counted as No); `mechintro rejudge` re-judges the stored responses without generating; a re-run retries
    any error left, and generates nothing once everything is judged."""
    import mechintro.behaviour.batch as batch
    from mechintro.behaviour.store import TrialStore
    from mechintro.cli.main import main

    monkeypatch.setenv("HOME", str(tmp_path))  # the judge's reply cache
    store = tmp_path / "runs.sqlite"
    run = [
        "--model",
        str(tiny_dir),
        "--concepts",
        "Bread,Oceans",
        "--n-trials",
        "2",
        "--max-new-tokens",
        "4",
        "--quiet",
        "--store",
        str(store),
        "--judge",
        "llm:test-model",
    ]
    with FailingAPI() as api:
        monkeypatch.setenv("OPENAI_BASE_URL", f"{api.url}/v1")
        assert main(["evaluate", *run]) == 1
        out = capsys.readouterr().out
        assert "8 of 8 trials have a judge error" in out and "every judge call failed" in out
        with TrialStore(store) as s:
            assert s.count_errors() == 8 and s.load()["response"].notna().all()
        api.failing = False
        assert main(["rejudge", "--store", str(store), "--judge", "llm:test-model"]) == 0
        assert "8 re-judged; 0 still have a judge error" in capsys.readouterr().out
        with TrialStore(store) as s:
            df = s.load()
        assert df["judge_error"].isna().all() and df["detected"].notna().all()
        monkeypatch.setattr(batch, "sample", lambda *a, **k: pytest.fail("re-generated judged trials"))
        assert main(["evaluate", *run]) == 0
        api.failing = True
        monkeypatch.undo()
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.setenv("OPENAI_BASE_URL", f"{api.url}/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-openai")
        more = [*run[:-1], "llm:test-model", "--n-trials", "3"]  # 4 new trials fail, then are retried
        assert main(["evaluate", *more]) == 0  # 8 of 12 judged: not every call failed
        assert "4 of 12 trials have a judge error" in capsys.readouterr().out
        api.failing = False
        assert main(["evaluate", *more]) == 0
        assert "judge error" not in capsys.readouterr().out
