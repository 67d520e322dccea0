"""EPD serving engine for LLaVA-style multimodal LLMs.

Entry points: `engine.LLM` (offline generation), `engine.SamplingParams`, `engine.Request`;
for frontends, `engine.EngineLoop` (engine/serving.py) over any `engine.Engine`.
"""

from __future__ import annotations

from engine.llm import LLM
from engine.request import CompletionOutput, Request, RequestOutput, TokenEvent
from engine.sampling import RequestError, SamplingParams
from engine.serving import Engine, EngineLoop

__all__ = ["CompletionOutput", "Engine", "EngineLoop", "LLM", "Request", "RequestError", "RequestOutput",
           "SamplingParams", "TokenEvent"]
