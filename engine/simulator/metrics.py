"""Serving metrics, as scripts/bench_serve.py defines them and `vllm bench serve` names them:
percentiles, TPOT, SLO attainment, goodput, one rate's summary. The load generator and the
simulator both compute them here, so a prediction and a measurement are judged by one rule.

A record is one request: success, ttft_s, tpot_s, e2el_s, itls_s, output_tokens, prompt_tokens,
error. A request meets the SLO when it succeeded, TTFT < slo_ttft and (if it has a TPOT)
TPOT < slo_tpot. Goodput: the highest rate whose attainment is >= the target; also the highest
rate whose P99 TTFT and P99 TPOT are under the SLOs.
"""

from __future__ import annotations

import math

PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tpot", "itl", "e2el")


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation (numpy's default); None when empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats_ms(values_s: list[float]) -> dict[str, float | None]:
    """mean / p50 / p90 / p99 in milliseconds of values given in seconds."""
    out: dict[str, float | None] = {"mean": sum(values_s) / len(values_s) * 1e3 if values_s else None}
    for q in PERCENTILES:
        p = percentile(values_s, q)
        out[f"p{q}"] = None if p is None else p * 1e3
    return out


def tpot_of(e2el: float | None, ttft: float | None, output_tokens: int) -> float | None:
    """(E2EL - TTFT) / (tokens - 1): the mean time per output token after the first; None for <= 1 token."""
    if e2el is None or ttft is None or output_tokens <= 1:
        return None
    return (e2el - ttft) / (output_tokens - 1)


def meets_slo(record: dict, slo_ttft: float, slo_tpot: float) -> bool:
    """Succeeded, TTFT < slo_ttft and TPOT < slo_tpot (a request of one token has no TPOT and is judged
    on TTFT alone). Failed requests miss."""
    if not record.get("success") or record.get("ttft_s") is None:
        return False
    tpot = record.get("tpot_s")
    return record["ttft_s"] < slo_ttft and (tpot is None or tpot < slo_tpot)


def attainment(records: list[dict], slo_ttft: float, slo_tpot: float) -> float:
    """Share of `records` (all of them, failed included) that meet the SLO; 0 for none."""
    if not records:
        return 0.0
    return sum(meets_slo(r, slo_ttft, slo_tpot) for r in records) / len(records)


def goodput_by_attainment(per_rate: list[dict], target: float = 0.9) -> float | None:
    """The highest rate whose `attainment` is >= target (None when no rate reaches it)."""
    ok = [r["rate"] for r in per_rate if r["attainment"] >= target]
    return max(ok) if ok else None


def goodput_by_p99(per_rate: list[dict], slo_ttft: float, slo_tpot: float) -> float | None:
    """vLLM-style: the highest rate whose P99 TTFT < slo_ttft and P99 TPOT < slo_tpot (a rate with no
    completed request, or none with a TPOT, fails / is judged on TTFT alone)."""
    ok = []
    for r in per_rate:
        ttft = r["ttft_ms"]["p99"]
        tpot = r["tpot_ms"]["p99"]
        if ttft is None or ttft >= slo_ttft * 1e3:
            continue
        if tpot is not None and tpot >= slo_tpot * 1e3:
            continue
        ok.append(r["rate"])
    return max(ok) if ok else None


def summarize_rate(rate: float, records: list[dict], duration_s: float, slo_ttft: float, slo_tpot: float) -> dict:
    """One rate's summary from its request records (vLLM's names; times in ms)."""
    done = [r for r in records if r.get("success")]
    out_tokens = sum(r.get("output_tokens") or 0 for r in done)
    good = sum(meets_slo(r, slo_ttft, slo_tpot) for r in records)
    duration = max(duration_s, 1e-9)
    return {
        "rate": rate,
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration_s,
        "request_throughput": len(done) / duration,
        "output_throughput": out_tokens / duration,
        "total_output_tokens": out_tokens,
        "total_prompt_tokens": sum(r.get("prompt_tokens") or 0 for r in done),
        "ttft_ms": stats_ms([r["ttft_s"] for r in done if r.get("ttft_s") is not None]),
        "tpot_ms": stats_ms([r["tpot_s"] for r in done if r.get("tpot_s") is not None]),
        "itl_ms": stats_ms([x for r in done for x in r.get("itls_s") or []]),
        "e2el_ms": stats_ms([r["e2el_s"] for r in done if r.get("e2el_s") is not None]),
        "attainment": attainment(records, slo_ttft, slo_tpot),
        "good_request_throughput": good / duration,  # vLLM's --goodput: SLO-meeting requests per second
        "errors": sorted({r["error"] for r in records if r.get("error")})[:10],
    }



def offered_rate(offsets: list[float]) -> float:
    """The mean send rate of requests sent at these offsets (s): (n - 1) / span; inf for one
    instant."""
    span = max(offsets) - min(offsets) if offsets else 0.0
    return (len(offsets) - 1) / span if span > 0 else math.inf


def summarize_phases(phases: list, records: list[dict], duration_s: float, slo_ttft: float,
                     slo_tpot: float) -> tuple[list[dict], dict]:
    """A multi-phase run's summaries: one per phase (its rate, `phase` = its index; its duration from
    its first send to its last reply) and one over all records (`phase` = "all", the rate offered
    overall). Records carry phase, scheduled_s, start_s and e2el_s."""
    per_phase = []
    for k, phase in enumerate(phases):
        recs = [r for r in records if r.get("phase") == k]
        if not recs:
            continue
        start = min(r["scheduled_s"] for r in recs)
        end = max(r["start_s"] + (r.get("e2el_s") or 0.0) for r in recs)
        per_phase.append({"phase": k, **summarize_rate(phase.rate, recs, end - start, slo_ttft, slo_tpot)})
    rate = offered_rate([r["scheduled_s"] for r in records])
    return per_phase, {"phase": "all", **summarize_rate(rate, records, duration_s, slo_ttft, slo_tpot)}
