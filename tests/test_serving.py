"""engine/serving.py: the Engine protocol and EngineLoop, with a scripted fake engine and the tiny LLM."""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from engine import Engine, EngineLoop, Request, SamplingParams
from engine.epd import EPDEngine
from engine.request import TokenEvent
from engine.serving import Failed, Finished, LoopStopped, RequestHandle, TokenDelta

TIMEOUT_S = 10


class _FakeEngine:
    """Each live request gets one token per step; it finishes after `length` tokens. step raises
    while `step_fails` is set, status while `status_fails` is."""

    def __init__(self, length: int = 3) -> None:
        self.length = length
        self.seqs: dict[int, SimpleNamespace] = {}
        self.aborted: list[int] = []
        self.step_fails = False
        self.status_fails = False
        self.next_id = 0

    def add_request(self, request, sampling=None, arrival=None):
        prompt = request.prompt if isinstance(request, Request) else request
        if prompt == "refuse":
            raise ValueError("prompt refused")
        seq = SimpleNamespace(seq_id=self.next_id, tokens=[])
        self.next_id += 1
        self.seqs[seq.seq_id] = seq
        return seq

    def step(self, timeout_s: float = 0.05) -> list[TokenEvent]:
        if self.step_fails:
            raise RuntimeError("step exploded")
        events = []
        for seq in list(self.seqs.values()):
            seq.tokens.append(100 * seq.seq_id + len(seq.tokens))
            done = len(seq.tokens) == self.length
            output = SimpleNamespace(token_ids=list(seq.tokens)) if done else None
            events.append(TokenEvent(seq.seq_id, seq.tokens[-1], f"<{seq.tokens[-1]}>", output))
            if done:
                del self.seqs[seq.seq_id]
        return events

    def abort(self, seq) -> None:
        self.aborted.append(seq.seq_id)
        self.seqs.pop(seq.seq_id, None)

    def has_work(self) -> bool:
        return bool(self.seqs)

    def status(self) -> dict:
        if self.status_fails:
            raise RuntimeError("status exploded")
        return {"mode": "fake", "running": len(self.seqs)}

    def tokenize(self, prompt: str, num_images: int = 0, raw_prompt: bool = False) -> tuple[str, list[int]]:
        return prompt, [len(prompt)]


@pytest.fixture()
def fake() -> Iterator[tuple[_FakeEngine, EngineLoop]]:
    engine = _FakeEngine()
    loop = EngineLoop(engine)
    loop.start()
    yield engine, loop
    loop.stop()
    assert loop.join(TIMEOUT_S), "the loop thread did not end"


def _on_engine_thread(loop: EngineLoop, fn):
    """fn's result (or exception), run on the loop's thread."""
    box: list = []
    ran = threading.Event()
    loop.call(fn, lambda result, error: (box.append((result, error)), ran.set()))
    assert ran.wait(TIMEOUT_S), "the call was never answered"
    result, error = box[0]
    if error is not None:
        raise error
    return result


def test_llm_and_the_orchestrator_are_engines(llama_llm) -> None:
    assert isinstance(llama_llm, Engine)
    members = ("add_request", "step", "abort", "has_work", "status", "tokenize")
    assert all(callable(getattr(EPDEngine, m, None)) for m in members)
    inspect.signature(EPDEngine.step).bind(object())  # step() with no argument, as the loop calls it


def test_events_are_delivered_per_request_and_in_order(fake) -> None:
    _, loop = fake
    handles = [loop.submit(Request(f"p{i}"), None, owner="a") for i in range(3)]
    for i, handle in enumerate(handles):
        events = list(handle.events(TIMEOUT_S))
        assert [type(e) for e in events] == [TokenDelta] * 3 + [Finished]
        assert [e.token_id for e in events[:3]] == [100 * i, 100 * i + 1, 100 * i + 2]
        assert "".join(e.text for e in events[:3]) == "".join(f"<{t}>" for t in events[3].output.token_ids)
    status = _on_engine_thread(loop, loop.status_now)
    assert (status["requests"], status["finished"], status["errors"], status["running"]) == (3, 3, 0, 0)


def test_a_sink_gets_the_events_on_the_engine_thread(fake) -> None:
    _, loop = fake
    seen: list = []
    done = threading.Event()

    def sink(event) -> None:
        seen.append((event, threading.current_thread().name))
        if not isinstance(event, TokenDelta):
            done.set()

    handle = loop.submit("hello", None, owner="a", sink=sink)
    assert done.wait(TIMEOUT_S)
    assert [type(e) for e, _ in seen] == [TokenDelta] * 3 + [Finished] and {t for _, t in seen} == {"engine"}
    with pytest.raises(RuntimeError, match="sink"):
        next(handle.events())


def test_a_refused_request_fails_its_handle_only(fake) -> None:
    _, loop = fake
    refused = loop.submit("refuse", None, owner="a")
    (event,) = list(refused.events(TIMEOUT_S))
    assert isinstance(event, Failed) and event.error == "prompt refused" and isinstance(event.exception, ValueError)
    assert isinstance(list(loop.submit("fine", None, owner="a").events(TIMEOUT_S))[-1], Finished)


def test_abort_by_owner(fake) -> None:
    engine, loop = fake
    engine.length = 10**9  # never finishes by itself
    mine = [loop.submit(f"m{i}", None, owner="gone") for i in range(2)]
    other = loop.submit("o", None, owner="stays")
    assert isinstance(next(other.events(TIMEOUT_S)), TokenDelta)
    loop.abort_owner("gone")
    assert _on_engine_thread(loop, lambda: sorted(engine.aborted)) == sorted(h.seq.seq_id for h in mine)
    assert _on_engine_thread(loop, lambda: sorted(loop.live)) == [other.seq.seq_id]


def test_a_raising_step_fails_only_the_live_requests(fake) -> None:
    engine, loop = fake
    engine.length = 10**9
    live = [loop.submit(f"p{i}", None, owner="a") for i in range(2)]
    for handle in live:
        assert isinstance(next(handle.events(TIMEOUT_S)), TokenDelta)

    def break_step() -> None:
        engine.step_fails = True

    _on_engine_thread(loop, break_step)
    for handle in live:
        last = list(handle.events(TIMEOUT_S))[-1]
        assert isinstance(last, Failed) and last.error == (
            "engine step failed: RuntimeError: step exploded (traceback in the server log)")
    assert sorted(engine.aborted) == sorted(h.seq.seq_id for h in live)
    engine.step_fails, engine.length = False, 2
    later = list(loop.submit("later", None, owner="a").events(TIMEOUT_S))  # the loop serves on
    assert [type(e) for e in later] == [TokenDelta, TokenDelta, Finished]
    assert _on_engine_thread(loop, loop.status_now)["errors"] == 2


def test_stop_fails_the_rest_with_server_stopped() -> None:
    engine = _FakeEngine(length=10**9)
    loop = EngineLoop(engine)
    loop.start()
    live = loop.submit("p", None, owner="a")
    assert isinstance(next(live.events(TIMEOUT_S)), TokenDelta)
    loop.stop()
    assert loop.join(TIMEOUT_S)
    last = list(live.events(TIMEOUT_S))[-1]
    assert isinstance(last, Failed) and last.error == "server stopped" and engine.aborted == [live.seq.seq_id]
    after = loop.submit("after", None, owner="a")  # refused at once, never queued forever
    assert [e.error for e in after.events(0)] == ["server stopped"]
    with pytest.raises(LoopStopped, match="server stopped"):
        _on_engine_thread(loop, lambda: 1)


def test_commands_queued_at_stop_are_cancelled_not_run() -> None:
    engine = _FakeEngine()
    loop = EngineLoop(engine)  # never started: what is queued stays queued until the drain
    ran: list[str] = []
    handle = loop.submit("queued", None, owner="a")
    answers: list = []
    loop.call(lambda: ran.append("call"), lambda result, error: answers.append(error))
    loop.stop()
    loop._run()  # the thread's body, here: it sees stopping at once and drains
    assert ran == [] and engine.seqs == {}
    assert [e.error for e in handle.events(0)] == ["server stopped"] and isinstance(answers[0], LoopStopped)


def test_status_survives_an_engine_status_that_raises(fake) -> None:
    engine, loop = fake
    engine.status_fails = True
    status = _on_engine_thread(loop, loop.status_now)
    assert status["engine_status_error"] == "RuntimeError: status exploded" and status["kv_sessions"] == 0
    assert {"requests", "finished", "errors"} <= set(status)
    assert _on_engine_thread(loop, lambda: engine.tokenize("abc")) == ("abc", [3])  # calls go on


def test_a_call_that_raises_counts_an_error_and_the_loop_goes_on(fake) -> None:
    _, loop = fake
    with pytest.raises(ZeroDivisionError):
        _on_engine_thread(loop, lambda: 1 / 0)
    assert _on_engine_thread(loop, loop.status_now)["errors"] == 1


def test_a_sink_that_raises_loses_only_its_own_events(fake) -> None:
    _, loop = fake

    def broken(event) -> None:
        raise OSError("client gone")

    loop.submit("a", None, owner="x", sink=broken)
    assert isinstance(list(loop.submit("b", None, owner="y").events(TIMEOUT_S))[-1], Finished)


# ---------------------------------------------------------------------- the tiny LLM


def test_the_loop_streams_what_the_llm_generates_offline(llama_llm) -> None:
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    want = llama_llm.generate(["Count the birds", "Hello there"], sp)
    loop = EngineLoop(llama_llm)
    loop.start()
    try:
        handles: list[RequestHandle] = [loop.submit(p, sp, owner="c") for p in ("Count the birds", "Hello there")]
        for handle, ref in zip(handles, want):
            events = list(handle.events(60))
            assert [e.token_id for e in events[:-1]] == ref.token_ids
            assert isinstance(events[-1], Finished) and events[-1].output.text == ref.text
        status = _on_engine_thread(loop, loop.status_now)
        assert status["mode"] == "aggregated" and status["running"] == 0
        assert status["kv_blocks_free"] == status["kv_blocks_total"] and status["decode_graphs_capture"]
    finally:
        loop.stop()
        assert loop.join(60)


def test_ttft_counts_from_submit_not_from_when_the_engine_thread_takes_it(llama_llm) -> None:
    """A request submitted while the engine thread is busy (here: a 0.3 s call) has its clock
    running from submit: its TTFT and queue time include the wait."""
    loop = EngineLoop(llama_llm)
    loop.start()
    try:
        started = threading.Event()
        loop.call(lambda: (started.set(), time.sleep(0.3)), lambda result, error: None)
        assert started.wait(10)
        handle = loop.submit("Count the birds", SamplingParams(max_tokens=2, ignore_eos=True), owner="c")
        out = list(handle.events(60))[-1].output
        waited = out.ttft_breakdown["queue_s"] + out.ttft_breakdown["wait_s"]  # text only: before prefill
        assert out.ttft_s >= 0.25 and waited >= 0.25
    finally:
        loop.stop()
        assert loop.join(60)


def test_kv_sessions_run_on_the_loop_and_close_with_their_owner(llama_llm) -> None:
    loop = EngineLoop(llama_llm)
    loop.start()
    try:
        session, seq = _on_engine_thread(
            loop, lambda: loop.open_session("owner", Request("Tell me"), SamplingParams(max_tokens=4)))
        tokens = _on_engine_thread(loop, lambda: loop.owned_sessions("owner", session).generate(session, 3))
        assert len(tokens) == 3 and seq.output_ids[-3:] == tokens
        with pytest.raises(ValueError, match="on this connection"):
            _on_engine_thread(loop, lambda: loop.owned_sessions("someone else", session))
        loop.abort_owner("owner")
        status = _on_engine_thread(loop, loop.status_now)
        assert status["kv_sessions"] == 0 and status["kv_blocks_free"] == status["kv_blocks_total"]
    finally:
        loop.stop()
        assert loop.join(60)
