"""Log-probabilities of sampled tokens: log_softmax of the raw model logits (vLLM's default "raw"
mode: before penalties and temperature), plus the top_logprobs most likely tokens, ties to the lower id.

Computed eagerly on the device after a step, only for the rows that asked; `LogprobBatch` holds
the device results until the step's tokens are read back, so a multi-step decode run queues one
per step and syncs once."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.request import Sequence, TokenLogprob


@dataclass
class LogprobBatch:
    chosen: torch.Tensor  # [m] fp32: logprob of each row's sampled token
    top_values: torch.Tensor  # [m, k] fp32, descending
    top_ids: torch.Tensor  # [m, k] int64

    def records(self, tokens: list[int], top_counts: list[int]) -> list[TokenLogprob]:
        """One record per row: its sampled token and its own top_counts[i] alternatives."""
        rows = zip(tokens, self.chosen.tolist(), self.top_ids.tolist(), self.top_values.tolist(), top_counts)
        return [TokenLogprob(t, lp, list(zip(ids[:k], values[:k]))) for t, lp, ids, values, k in rows]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> LogprobBatch:
    """logits [m, V] (raw), tokens [m] int64 on logits' device, k top alternatives per row."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens.long()[:, None])[:, 0]
    if k == 0:
        empty = logprobs[:, :0]
        return LogprobBatch(chosen, empty, empty.long())
    # a stable descending sort puts equal values in index order (topk does not promise that)
    values, ids = logprobs.sort(dim=-1, descending=True, stable=True)
    return LogprobBatch(chosen, values[:, :k], ids[:, :k])


def logprob_rows(seqs: list[Sequence]) -> list[int]:
    """Indices of the sequences that asked for logprobs."""
    return [i for i, s in enumerate(seqs) if s.sampling.logprobs]


def append_records(seqs: list[Sequence], tokens: list[int], batch: LogprobBatch) -> None:
    """Append one TokenLogprob per sequence (the rows of `batch`, in order) to seq.logprobs."""
    for seq, record in zip(seqs, batch.records(tokens, [s.sampling.top_logprobs for s in seqs])):
        if seq.logprobs is None:
            seq.logprobs = []
        seq.logprobs.append(record)
