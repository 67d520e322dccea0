"""The worker shell (ipc/worker.py) and the stage roles (engine/roles/) apart from each other:
the shell with a scripted role, in this process and in a spawned one; the real roles in this
process with a list as their outbox, wired by hand the way the orchestrator wires them."""

from __future__ import annotations

from pathlib import Path

import multiprocess as mp
import pytest

from engine import LLM, Request, SamplingParams
from engine.config import EngineConfig, ModelConfig
from engine.epd import EPDEngine
from engine.messages import (
    DecodeTask,
    Encoded,
    EncodeTask,
    Exported,
    Failed,
    FreeKV,
    FreeMM,
    Loaded,
    Peers,
    Prefilled,
    PrefillTask,
    Ready,
    Sized,
    SizeKV,
    Tokens,
)
from engine.roles import RoleSpec, build_role
from ipc.worker import Crashed, Shutdown, StageStatus, Switched, SwitchRole, _Shell, serve, worker_main


class _Inbox:
    """recv/poll over a script of message batches: poll sees only the batch being read (the
    next arrives while the worker blocks); the end of the script reads as the pipe's end."""

    def __init__(self, *batches: list) -> None:
        self.batches = [list(b) for b in batches]

    def poll(self, timeout: float | None = None) -> bool:
        if timeout:  # the worker waits: the next batch arrives meanwhile (or the pipe's end)
            while self.batches and not self.batches[0]:
                self.batches.pop(0)
            return True
        return bool(self.batches and self.batches[0])

    def recv(self):
        while self.batches and not self.batches[0]:
            self.batches.pop(0)
        if not self.batches:
            raise EOFError
        return self.batches[0].pop(0)


class _Counter:
    """A role with `work` units to do per message; drain() stops it taking more."""

    def __init__(self) -> None:
        self.work, self.done, self.handled, self.draining, self.closed = 0, 0, [], False, False

    @property
    def busy(self) -> bool:
        return self.work > 0

    def handle(self, msg) -> None:
        self.handled.append(msg)
        if not self.draining:
            self.work += msg

    def step(self) -> None:
        self.work -= 1
        self.done += 1

    def drain(self) -> None:
        self.draining = True

    def stats(self) -> dict:
        return {"done": self.done}

    def close(self) -> None:
        self.closed = True


def test_shell_steps_while_busy_and_reports_before_it_waits() -> None:
    role, sent = _Counter(), []
    serve(_Shell(role, "w0"), _Inbox([3, 2], [Shutdown()]), sent.append)
    # both messages were waiting: handled together, then 5 steps before it blocks for the Shutdown
    assert role.handled == [3, 2] and role.done == 5 and role.closed is False  # worker_main closes
    reports = [m.stats["done"] for m in sent if isinstance(m, StageStatus)]
    assert reports[0] == 0 and reports[-1] == 5  # idle reports are never throttled


def test_an_idle_shell_wakes_to_report_what_changed_on_another_thread() -> None:
    """An idle worker's wait for messages ends after IDLE_WAKE_S: a figure that changed meanwhile
    on another thread (an arena served over a link counts blocks on the link's thread) is reported
    without any message arriving."""
    from ipc.worker import IDLE_WAKE_S

    role, sent = _Counter(), []

    class Quiet:
        waits = []

        def poll(self, timeout=None):
            if not timeout:
                return False
            self.waits.append(timeout)
            if len(self.waits) == 1:  # the wait times out; meanwhile another thread changed a figure
                role.done = 7
                return False
            return True

        def recv(self):
            return Shutdown()

    serve(_Shell(role, "w0"), Quiet(), sent.append)
    assert Quiet.waits == [IDLE_WAKE_S, IDLE_WAKE_S] and 0 < IDLE_WAKE_S <= 1.0
    assert [m.stats["done"] for m in sent if isinstance(m, StageStatus)] == [0, 7]


def test_shell_drain_finishes_work_in_hand_and_takes_no_more() -> None:
    role = _Counter()
    serve(_Shell(role, "w0"), _Inbox([4, Shutdown(drain=True), 7]), lambda m: None)
    assert role.draining and role.handled == [4, 7] and role.done == 4  # the 7 came after the drain
    role = _Counter()
    serve(_Shell(role, "w0"), _Inbox([4, Shutdown(), 7]), lambda m: None)
    assert role.handled == [4] and role.done == 0  # a plain Shutdown leaves at once


def test_shell_switches_role_and_reports_under_the_new_name() -> None:
    """SwitchRole: the old role drains (what comes with the switch is still its), is closed, the
    new one built with the worker's send; the messages after it (and the reports) are the new
    role's."""
    old, new, sent = _Counter(), _Counter(), []
    shell = _Shell(old, "encode1")
    built = []
    switch = SwitchRole("prefill1", lambda send: (built.append(send), new)[1])
    serve(shell, _Inbox([2], [switch, 1], [3], [Shutdown()]), sent.append)
    # the 1 came with the switch: the old role's (a free, an abort), taken while it drains
    assert old.closed and old.handled == [2, 1] and old.done == 2
    assert [m.stage for m in sent if isinstance(m, Switched)] == ["prefill1"]
    assert shell.role is new and shell.name == "prefill1" and built == [sent.append]
    assert new.handled == [3] and new.done == 3 and not new.closed  # worker_main closes the last one
    names = [m.stage for m in sent if isinstance(m, StageStatus)]
    assert names[0] == "encode1" and names[-1] == "prefill1"


def test_shell_treats_the_end_of_its_inbox_as_shutdown() -> None:
    role = _Counter()
    serve(_Shell(role, "w0"), _Inbox([1]), lambda m: None)
    assert role.done == 1


# ----------------------------------------------------------------------------- in a process


class _Echo:
    busy = False

    def __init__(self, send) -> None:
        self.send = send
        send("built")

    def handle(self, msg) -> None:
        if msg == "boom":
            raise ValueError("boom from the role\nsecond line")
        self.send(("echo", msg))

    def step(self) -> None: ...

    def drain(self) -> None: ...

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        self.send("closed")


def _build_echo(send):
    return _Echo(send)


def _build_fails(send):
    raise RuntimeError("cannot build: no weights")


def _spawn(build):
    ctx = mp.get_context("spawn")
    inbox_r, inbox_w = ctx.Pipe(duplex=False)
    outbox_r, outbox_w = ctx.Pipe(duplex=False)
    import os

    proc = ctx.Process(target=worker_main, args=(build, "w0", os.getpid(), 1, inbox_r, outbox_w), daemon=True)
    proc.start()
    inbox_r.close()
    outbox_w.close()
    return proc, inbox_w, outbox_r


def _until(outbox, cond, limit: int = 50) -> list:
    got = []
    for _ in range(limit):  # bounded: the worker sends a handful of messages
        if not outbox.poll(20):
            break
        msg = outbox.recv()
        got.append(msg)
        if cond(msg):
            break
    return got


def test_worker_process_hosts_the_role_it_is_handed_and_exits_on_shutdown() -> None:
    proc, inbox, outbox = _spawn(_build_echo)
    assert "built" in _until(outbox, lambda m: m == "built")
    inbox.send("hello")
    assert ("echo", "hello") in _until(outbox, lambda m: m == ("echo", "hello"))
    inbox.send(Shutdown())
    assert "closed" in _until(outbox, lambda m: m == "closed")
    proc.join(20)
    assert proc.exitcode == 0


def test_worker_process_reports_a_crash_in_one_line_and_exits_1() -> None:
    for build, error in ((_build_fails, "RuntimeError: cannot build: no weights"),
                         (_build_echo, "ValueError: boom from the role")):
        proc, inbox, outbox = _spawn(build)
        if build is _build_echo:
            inbox.send("boom")
        crash = [m for m in _until(outbox, lambda m: isinstance(m, Crashed)) if isinstance(m, Crashed)]
        proc.join(20)
        assert proc.exitcode == 1 and crash and crash[0].error == error, crash
        assert "Traceback" in crash[0].traceback and crash[0].stage == "w0"


# ----------------------------------------------------------------------------- the roles in-process


def test_roles_wired_by_hand_serve_a_request_as_the_aggregated_engine(tiny_llava: Path) -> None:
    """The roles need no process and no orchestrator: built from an EngineConfig with a list as
    outbox, they answer a 2-image request with aggregated's tokens. Multi-step decode (4 steps
    per call) runs in the decode role."""
    from test_epd import _png

    config = EngineConfig(str(tiny_llava), backend="torch", device="cpu", multi_step=4)
    cfg = ModelConfig.from_dir(tiny_llava)
    config = config.for_model(cfg)
    sp = SamplingParams(max_tokens=9, ignore_eos=True)
    images = [_png(1), _png(2)]
    llm = LLM(config)
    reference = llm.generate([Request("Compare <image> and <image>", images=images)], sp)[0].token_ids
    prompt_ids = llm.make_sequence(Request("Compare <image> and <image>", images=images), sp).prompt_ids

    out: dict[str, list] = {"encode0": [], "prefill0": [], "decode0": []}
    roles = {name: build_role(RoleSpec(name[:-1], 0, config, shared=True), out[name].append)
             for name in ("encode0", "prefill0", "decode0")}
    enc, pre, dec = roles["encode0"], roles["prefill0"], roles["decode0"]
    assert [type(m) for m in out["encode0"]] == [Loaded, Exported, Ready]
    assert [type(m) for m in out["prefill0"]] == [Loaded] and out["decode0"] == [Loaded("decode0", kv_owner=False)]
    pre.handle(SizeKV(for_decode=True))  # kv_cache_tokens unset on the CPU: 4 x context, and as many for decode
    sized = out["prefill0"][1]
    assert isinstance(sized, Sized) and sized.blocks == config.num_kv_blocks()
    pre.handle(Peers([out["encode0"][1].handle]))
    dec.handle(Peers([out["prefill0"][2].handle], kv_owned=[sized.blocks]))
    assert isinstance(out["prefill0"][-1], Ready) and isinstance(out["decode0"][-1], Ready)
    assert out["prefill0"][-1].stats["mm_in_place_from"] == [0]

    enc.handle(EncodeTask(7, 0, images))
    assert enc.busy
    for _ in range(1000):  # preprocessing runs on the encoder's thread: a few steps
        if not enc.busy:
            break
        enc.step()
    encoded = out["encode0"][-1]
    assert isinstance(encoded, Encoded) and len(encoded.blocks) == 2
    pre.handle(PrefillTask(7, prompt_ids, [(0, b) for b in encoded.blocks], sp, seed=0))
    pre.step()
    prefilled = next(m for m in out["prefill0"] if isinstance(m, Prefilled))
    freed = [m for m in out["prefill0"] if isinstance(m, FreeMM)]
    assert freed == [FreeMM(encoded.blocks, 0)] and prefilled.mm_bytes == 0  # read in place, then freed
    enc.handle(freed[0])
    assert enc.blocks.num_free == enc.blocks.num_blocks
    dec.handle(DecodeTask(7, prompt_ids, prefilled.first_token, 0, prefilled.kv_blocks, sp, seed=0))
    steps = 0
    while dec.busy and steps < 20:
        dec.step()
        steps += 1
    tokens = [prefilled.first_token] + [t for m in out["decode0"] if isinstance(m, Tokens) for t in m.token_ids]
    assert tokens == reference
    assert steps == 2  # 8 tokens after the first, 4 per call
    kv_back = [m for m in out["decode0"] if isinstance(m, FreeKV)]
    assert kv_back == [FreeKV(prefilled.kv_blocks, 0)]  # the prompt's blocks, read in place, go back at the end
    pre.handle(kv_back[0])
    assert pre.kv_blocks.num_free == pre.kv_blocks.num_blocks
    assert dec.engine.kv_blocks.num_free == dec.engine.kv_blocks.num_blocks

    # a draining role refuses new work with an error naming it
    enc.drain()
    enc.handle(EncodeTask(8, 0, images))
    assert out["encode0"][-1] == Failed(8, "encode0", "encode0 is draining and takes no new requests", images=2)
    for role in roles.values():
        role.close()


@pytest.mark.parametrize("placement", ["E:cpu P:cpu D:cpu"])
def test_epd_multi_step_decode_matches_aggregated(tiny_llava: Path, placement: str) -> None:
    from test_epd import _requests

    sp = SamplingParams(max_tokens=10, ignore_eos=True)
    settings = dict(backend="torch", device="cpu", multi_step=4)
    reference = [o.token_ids for o in LLM(tiny_llava, **settings).generate(_requests(), sp)]
    with EPDEngine(tiny_llava, placement=placement, **settings) as epd:
        assert epd.stages["decode0"].ready["multi_step"] == 4
        assert [o.token_ids for o in epd.generate(_requests(), sp)] == reference



def test_messages_go_through_the_c_pickler_and_closures_through_dill() -> None:
    """ipc/channel.dumps: plain messages as pickle writes them (the C pickler: dill's pure-Python
    one took 3.2 ms for a 1200-token PrefillTask); a closure, which pickle cannot carry, through
    dill; a pipe's reader (multiprocess recv) reads both."""
    import pickle
    from functools import partial

    from engine.messages import PrefillTask
    from engine.sampling import SamplingParams
    from ipc.channel import dumps, sender

    task = PrefillTask(7, list(range(1200)), [(0, 1)], SamplingParams(max_tokens=3), 11)
    assert dumps(task) == pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL)
    offset = 5
    closure = lambda x: x + offset  # noqa: E731 - a local function: pickle refuses it
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(closure)
    reader, writer = mp.get_context("spawn").Pipe(duplex=False)
    try:
        send = sender(writer)
        for msg in (task, closure, partial(max, 3)):
            send(msg)
        got = [reader.recv() for _ in range(3)]
        assert got[0] == task and got[1](1) == 6 and got[2](1) == 3
    finally:
        reader.close()
        writer.close()
