"""The one token path: Sequence.append_tokens / append_step (stop tokens, max_tokens, tokens past
a stop dropped) on the engine side, the OutputProcessor (text, stop strings, outputs) on the
frontend side, and the aggregated LLM, the EPD decode-stage loop and the EPD orchestrator all
ending a request on the same token."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.estimator import LoadEstimator
from engine.messages import Abort, DecodeTask, Prefilled, Tokens
from engine.output_processor import OutputProcessor
from engine.request import Sequence, Status, TokenLogprob, append_step
from engine.schedulers import blocks_for
from ipc.worker import Shutdown


def _seq(max_tokens: int = 10, stops: tuple[int, ...] = (), seq_id: int = 0) -> Sequence:
    return Sequence(seq_id=seq_id, prompt_ids=[1, 2], sampling=SamplingParams(max_tokens=max_tokens), seed=0,
                    stop_token_ids=frozenset(stops))


def test_append_tokens_stops_at_a_stop_token_and_drops_the_rest() -> None:
    seq = _seq(stops=(7,))
    assert seq.append_tokens([3, 4]) == [3, 4] and seq.finish_reason is None
    assert seq.append_tokens([5, 7, 8, 9]) == [5, 7]  # a multi-step run sampled past the stop
    assert seq.finish_reason == "stop" and seq.output_ids == [3, 4, 5, 7]
    assert seq.append_tokens([1]) == [] and seq.output_ids == [3, 4, 5, 7]  # finished: nothing more


def test_append_tokens_stops_at_max_tokens() -> None:
    seq = _seq(max_tokens=3, stops=(7,))
    assert seq.append_tokens([1]) == [1]
    assert seq.append_tokens([2, 3, 7]) == [2, 3] and seq.finish_reason == "length"
    stopped = _seq(max_tokens=2, stops=(7,))
    assert stopped.append_tokens([1, 7]) == [1, 7] and stopped.finish_reason == "stop"  # the stop token wins
    done = _seq()
    done.status = Status.FINISHED  # released by the engine (a stop string, an abort)
    assert done.append_tokens([1]) == [] and done.output_ids == []


def test_append_step_keeps_generation_order_and_records() -> None:
    a, b = _seq(stops=(7,), seq_id=0), _seq(max_tokens=3, seq_id=1)
    a.logprobs = [TokenLogprob(t, -float(t)) for t in (1, 7, 9)]  # one record per sampled token
    produced = [(a, 1), (b, 2), (a, 7), (b, 3), (a, 9), (b, 4)]  # 3 steps of 2 sequences
    kept = append_step(produced)
    assert [(k.seq.seq_id, k.token, k.finish_reason) for k in kept] == [
        (0, 1, None), (1, 2, None), (0, 7, "stop"), (1, 3, None), (1, 4, "length")]
    assert [k.logprob.token_id for k in kept if k.seq is a] == [1, 7]
    assert all(k.logprob is None for k in kept if k.seq is b)


class _Tok:
    """decode: each id's piece, concatenated."""

    PIECES = {1: "he", 2: "llo", 3: " wor", 4: "ld", 5: "!"}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.PIECES[i] for i in ids)


def test_stop_string_across_two_tokens_cuts_the_text_and_finishes_the_sample() -> None:
    outputs = OutputProcessor(_Tok())
    outputs.add(0, [9], SamplingParams(max_tokens=10, stop=("lo w",)))
    first, finished = outputs.process(0, 0, 1, 1.0)
    assert (first.text_delta, first.output, finished) == ("he", None, False)
    assert outputs.process(0, 0, 2, 2.0)[0].text_delta == "llo"
    event, finished = outputs.process(0, 0, 3, 3.0)  # "hello wor": the stop string ends here
    assert finished and event.text_delta == "" and event.output is not None  # the caller tells the engine
    out = event.output
    assert (out.text, out.token_ids, out.finish_reason, out.prompt_token_ids) == ("hel", [1, 2, 3], "stop", [9])
    assert len(out.token_times_s) == 3 and out.token_times_s == sorted(out.token_times_s)
    assert outputs.process(0, 0, 4, 4.0) == (None, False) and not outputs.states  # gone with its output


def test_n_samples_output_comes_with_the_last_sample() -> None:
    outputs = OutputProcessor(_Tok())
    outputs.add(5, [9], SamplingParams(max_tokens=2, n=2, logprobs=True))
    record = TokenLogprob(1, -0.5)
    event, finished = outputs.process(5, 0, 1, 1.0, None, record)
    assert (event.index, event.sample, event.text_delta, event.output, finished) == (5, 0, "he", None, False)
    assert outputs.process(5, 1, 3, 1.0)[0].sample == 1  # a fork's first token makes its state
    event, finished = outputs.process(5, 0, 2, 2.0, "length", TokenLogprob(2, -0.25))
    assert finished and event.output is None  # sample 1 is still running
    event, finished = outputs.process(5, 1, 4, 2.0, "length")
    assert finished and event.sample == 1 and event.output is not None
    out = event.output
    assert [(o.index, o.text, o.token_ids, o.finish_reason) for o in out.outputs] == [
        (0, "hello", [1, 2], "length"), (1, " world", [3, 4], "length")]
    assert out.outputs[0].logprobs == [record, TokenLogprob(2, -0.25)] and out.outputs[1].logprobs is None
    assert (out.text, out.token_ids, out.finish_reason) == ("hello", [1, 2], "length")


def test_abort_before_the_fork_gives_every_sample() -> None:
    outputs = OutputProcessor(_Tok())
    outputs.add(1, [9], SamplingParams(n=3))
    outputs.process(1, 0, 1, 1.0)
    out = outputs.abort(1, 2.0)
    assert [(o.index, o.text, o.token_ids, o.finish_reason) for o in out.outputs] == [
        (0, "he", [1], "abort"), (1, "", [], "abort"), (2, "", [], "abort")]
    assert outputs.abort(1, 3.0) is None


def test_aggregated_stop_string_with_multi_step_tells_the_engine(llama_llm: LLM) -> None:
    """A stop string completed mid multi-step run: the text is cut, the later tokens of the run
    are dropped, and the engine has released the sequence by the time the output comes."""
    events = list(llama_llm.stream("Count the birds", SamplingParams(max_tokens=16, ignore_eos=True)))
    deltas, ids = [ev.text_delta for ev in events], [ev.token_id for ev in events]
    base, ends = "".join(deltas), list(itertools.accumulate(len(d) for d in deltas))
    # a stop string across two tokens' text, found there first: the last char of one, the next's first two
    k, stop = next((k, deltas[k][-1] + deltas[k + 1][:2]) for k in range(1, len(deltas) - 1)
                   if deltas[k] and deltas[k + 1] and base.find(deltas[k][-1] + deltas[k + 1][:2]) == ends[k] - 1)
    engine = llama_llm.engine
    engine.multi_step = 4
    try:
        seq = llama_llm.add_request("Count the birds", SamplingParams(max_tokens=16, ignore_eos=True, stop=(stop,)))
        got = []
        while not got or got[-1].output is None:
            got += llama_llm.step()
        assert seq.status is Status.FINISHED and not engine.has_work()
    finally:
        engine.multi_step = 1
    out = got[-1].output
    assert (out.text, out.finish_reason) == (base[: ends[k] - 1], "stop")
    assert out.token_ids == [ev.token_id for ev in got] == ids[: k + 2]  # the token that completed it is the last
    assert engine.kv_blocks.num_free == llama_llm.runner.num_kv_blocks


class _Pipe:
    """A stage's inbox and outbox in one: recv() the queued messages, then Shutdown."""

    def __init__(self, msgs: list) -> None:
        self.msgs, self.sent = list(msgs), []

    def recv(self):
        return self.msgs.pop(0) if self.msgs else Shutdown()

    def poll(self) -> bool:
        return bool(self.msgs)

    def send(self, msg) -> None:
        self.sent.append(msg)

    put = send  # an orchestrator's StageHandle writes its inbox with put


class _Alive:
    exitcode = None

    def is_alive(self) -> bool:
        return True


@pytest.fixture
def stop_case(llama_llm: LLM) -> tuple[list[int], SamplingParams, list[int]]:
    """Greedy tokens without a stop, sampling with a stop token from them, and the tokens that
    stop gives (up to its first occurrence)."""
    reference = llama_llm.generate("Count the birds", SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    # a token first sampled mid multi-step run (runs of 4 after the prefill's token: 1-4, 5-8, 9-11)
    stop_id = next(t for p, t in enumerate(reference) if p >= 2 and p % 4 and reference.index(t) == p)
    sp = SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=(stop_id,))
    return reference, sp, reference[: reference.index(stop_id) + 1]


def test_every_mode_ends_at_the_same_stop_token(llama_llm: LLM, tiny_llama: Path, stop_case) -> None:
    """The aggregated LLM (multi-step), the EPD decode role (in-process, multi-step) and the EPD
    orchestrator (stages faked, given the tokens past the stop a decode could
    send) run the same append_step: each ends the request on the stop token."""
    from engine.config import EngineConfig
    from engine.epd import EPDEngine, StageHandle
    from engine.messages import Peers, SizeKV
    from engine.roles import RoleSpec, build_role
    from engine.router import Router
    from ipc.arena import SharedArena

    reference, sp, expected = stop_case
    assert len(expected) < len(reference) and (len(expected) - 1) % 4  # tokens past the stop get sampled
    llama_llm.engine.multi_step = 4
    try:
        aggregated = llama_llm.generate("Count the birds", sp)[0]
    finally:
        llama_llm.engine.multi_step = 1
    assert (aggregated.token_ids, aggregated.finish_reason) == (expected, "stop")

    # the decode role (in-process, multi-step 4): prefill on llama_llm, its KV blocks put in an
    # exported arena the role maps and pulls from
    seq = llama_llm.make_sequence("Count the birds", sp)
    seq.block_table = llama_llm.engine.kv_blocks.allocate(blocks_for(len(seq.prompt_ids), llama_llm.runner.block_size))
    first = llama_llm.runner.prefill([seq]).token_ids[0]
    kv = llama_llm.runner.kv_arena
    prefill_arena = SharedArena.create(tuple(kv.shape), kv.dtype, "cpu", "kv-test")
    prefill_arena.tensor.copy_(kv)
    blocks = list(seq.block_table)
    llama_llm.engine.finish(seq)
    sent: list = []
    config = EngineConfig(str(tiny_llama), backend="torch", device="cpu", multi_step=4)
    decode = build_role(RoleSpec("decode", 0, config.for_model(llama_llm.cfg)), sent.append)
    try:
        decode.handle(SizeKV())
        decode.handle(Peers([prefill_arena.handle]))
        decode.handle(DecodeTask(7, seq.prompt_ids, first, 0, blocks, sp, seq.seed, seq.stop_token_ids))
        for _ in range(10):  # bounded: 3 calls of 4 steps at most
            if not decode.busy:
                break
            decode.step()
    finally:
        decode.close()
        prefill_arena.close()
    tokens = [t for m in sent if isinstance(m, Tokens) for t in m.token_ids]
    assert [first, *tokens] == expected
    assert not decode.engine.has_work() and decode.engine.kv_blocks.num_free == decode.engine.kv_blocks.num_blocks

    # the orchestrator, stages faked: everything decode might have sampled arrives at once
    epd = EPDEngine.__new__(EPDEngine)
    epd.estimator, epd.dynamic = LoadEstimator(), None
    epd.flights, epd.late_events, epd.broken, epd.mode, epd.router, epd.image_bytes = {}, [], None, "pd", Router(), None
    epd.input_processor, epd.output_processor = llama_llm.input_processor, OutputProcessor(llama_llm.tokenizer)
    prefill, dec = (StageHandle(kind, 0, "cpu", _Alive(), _Pipe([]), None) for kind in ("prefill", "decode"))
    epd.stages = {"prefill0": prefill, "decode0": dec}
    seq = epd.add_request("Count the birds", sp)
    events: list = []
    epd._handle(prefill, Prefilled(seq.seq_id, reference[0], 0, [0]), events)
    epd._handle(dec, Tokens([seq.seq_id] * (len(reference) - 1), reference[1:]), events)
    assert [ev.token_id for ev in events] == expected and events[-1].output.token_ids == expected
    assert events[-1].output.finish_reason == "stop" and not epd.flights and not epd.output_processor.states
    assert isinstance(dec.inbox.sent[-1], Abort) and dec.load == 0  # released there too
