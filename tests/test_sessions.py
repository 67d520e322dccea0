"""kv sessions (engine/sessions.py) with the sampling features: n refused, penalties follow a forced token."""

from __future__ import annotations

import pytest

from engine import Request, RequestError, SamplingParams
from engine.sessions import KVSessions


def test_n_is_refused(llama_llm) -> None:
    with pytest.raises(RequestError, match="sampling.n = 2"):
        KVSessions(llama_llm).init(Request("Hello"), SamplingParams(n=2))


def test_forced_token_rebuilds_the_penalty_counts(llama_llm) -> None:
    sessions = KVSessions(llama_llm)
    sp = SamplingParams(max_tokens=8, frequency_penalty=1.5)
    session, seq = sessions.init(Request("Count the birds"), sp)
    sampled = seq.output_ids[-1]
    forced = (sampled + 1) % llama_llm.cfg.text.vocab_size
    sessions.step(session, token_id=forced)
    counts = llama_llm.runner.penalties.counts[seq.penalty_slot]
    want = {}
    for t in seq.output_ids:
        want[t] = want.get(t, 0) + 1
    if sampled not in want:  # the overwritten sample must no longer be counted
        assert int(counts[sampled]) == 0
    assert {t: int(counts[t]) for t in want} == want
    sessions.close(session)
    assert seq.penalty_slot == -1
