"""EPD serving engine for LLaVA-style multimodal LLMs.

Entry points: `engine.LLM` (offline generation), `engine.SamplingParams`, `engine.Request`.
"""

from __future__ import annotations

from engine.llm import LLM
from engine.request import CompletionOutput, Request, RequestOutput, TokenEvent
from engine.sampling import RequestError, SamplingParams

__all__ = ["CompletionOutput", "LLM", "Request", "RequestError", "RequestOutput", "SamplingParams", "TokenEvent"]
