"""kv sessions: a client holds one sequence's KV cache across calls and advances it itself.

kv_init prefills a prompt and returns the first token; kv_step feeds one token (the sampled one,
or one the client chooses) and returns the next; kv_generate runs n decode steps back to back
(one multi-step graph replay chain); kv_close frees the blocks. Sessions use the engine's block
pools and runner but never its schedulers, so they advance only when asked.
"""

from __future__ import annotations

import itertools

from engine.llm import LLM
from engine.request import Request, Sequence
from engine.sampling import RequestError, SamplingParams
from engine.schedulers import blocks_for


def sessions_for(engine: object) -> KVSessions | None:
    """kv sessions for an engine that has them: the in-process aggregated `LLM` (they drive its
    runner directly); None for the EPD orchestrator."""
    return KVSessions(engine) if isinstance(engine, LLM) else None


class KVSessions:
    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.sessions: dict[int, Sequence] = {}
        self._ids = itertools.count(1)

    def _get(self, session: object) -> Sequence:
        if session not in self.sessions:
            raise RequestError(f"no kv session {session!r}")
        return self.sessions[session]

    def _reserve(self, seq: Sequence, num_tokens: int) -> None:
        """Hold KV blocks for num_tokens tokens, or raise without changing anything."""
        limit = self.llm.max_model_len
        if num_tokens > limit:
            raise RequestError(f"kv session would hold {num_tokens} tokens; the context length is {limit}")
        need = blocks_for(num_tokens, self.llm.runner.block_size) - len(seq.block_table)
        if need > 0:
            blocks = self.llm.engine.kv_blocks.allocate(need)
            if blocks is None:
                raise RequestError(f"KV cache full: the session needs {need} more blocks, "
                                   f"{self.llm.engine.kv_blocks.num_free} are free")
            seq.block_table += blocks

    def init(self, request: Request, sampling: SamplingParams) -> tuple[int, Sequence]:
        """Prefill; the session's sampled first token is seq.output_ids[-1]."""
        sp = request.sampling or sampling
        if sp is not None and sp.n > 1:
            raise RequestError(f"sampling.n = {sp.n}; a kv session holds one sequence (n must be 1)")
        seq = self.llm.make_sequence(request, sampling)
        engine, runner = self.llm.engine, self.llm.runner
        self._reserve(seq, seq.num_tokens)
        try:
            if seq.num_items:
                misses = engine.encode.acquire(seq)
                if misses is None:
                    raise RequestError("MM arena full; retry when running requests have been prefilled")
                runner.encode([seq], [(seq, i) for i in misses])
            seq.output_ids.append(runner.prefill([seq]).token_ids[0])
        except Exception:
            self.llm.abort(seq)
            raise
        finally:
            if seq.mm_blocks:
                engine.encode.release(seq)
        session = next(self._ids)
        self.sessions[session] = seq
        return session, seq

    def step(self, session: object, token_id: int | None = None) -> int:
        """Feed token_id (default: the last sampled token) and return the next token."""
        seq = self._get(session)
        if token_id is not None:
            if not isinstance(token_id, int) or not 0 <= token_id < self.llm.cfg.text.vocab_size:
                raise RequestError(f"token_id {token_id!r} is outside the vocabulary "
                                   f"[0, {self.llm.cfg.text.vocab_size})")
            seq.output_ids[-1] = token_id
            self.llm.runner.init_penalty_state(seq)  # the counts held the sampled token, not this one
        return self.generate(session, 1)[0]

    def generate(self, session: object, num_steps: int) -> list[int]:
        """num_steps decode steps back to back; returns the tokens."""
        seq = self._get(session)
        max_steps = self.llm.runner.decode_graphs.max_steps
        if not isinstance(num_steps, int) or not 1 <= num_steps <= max_steps:
            raise RequestError(f"num_steps = {num_steps!r}; must be an integer in [1, {max_steps}]")
        self._reserve(seq, seq.num_tokens + num_steps - 1)
        tokens, _ = self.llm.runner.decode([seq], num_steps)
        out = [step[0] for step in tokens]
        seq.output_ids += out
        return out

    def close(self, session: object) -> int:
        """Free the session; returns how many tokens it held."""
        seq = self._get(session)
        del self.sessions[session]
        self.llm.abort(seq)
        return seq.num_tokens
