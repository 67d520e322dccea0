"""Stage roles for EPD serving: encode, prefill, decode. A role is built from a RoleSpec (its
kind, index and the resolved EngineConfig) inside a worker process (ipc/worker.py), which feeds
it messages (engine/messages.py) and calls step() while it is busy. Roles hold their weights,
arenas, block managers and runner; they hold no queues of the transport and never block.

    encode:   EncodeTask -> image embeddings into its MM arena (cached ones are not encoded
              again) -> Encoded
    prefill:  PrefillTask (MM refs) -> reads the embeddings (in place when the encoder's arena
              is on its device, else copied into its own MM blocks), frees them (FreeMM, for
              the encoder), prefills into its KV arena -> Prefilled
    decode:   DecodeTask (a prefill instance's KV blocks) -> pulls them, acks (FreeKV, for that
              prefill) -> Tokens (one message per step) ...

Start-up (engine/messages.py): every role loads its weights and says Loaded; prefill and decode
size their KV arena when told (SizeKV), so roles on one GPU size one after another, each seeing
what the others hold; arenas are exported, peers mapped (Peers), then Ready. One prefill and one
decode on one device share one KV arena (prefill owns the first blocks, decode the rest): decode
reads the prompt's blocks in place and acknowledges them when the request ends. Otherwise decode
pulls the blocks (ipc/migration.py) and acknowledges at once. Hand-off copies are timed on the
host around their sync and reported.
"""

from __future__ import annotations

from engine.roles.base import RoleSpec, Send
from engine.roles.decode import DecodeRole
from engine.roles.encode import EncodeRole
from engine.roles.prefill import PrefillRole

__all__ = ["DecodeRole", "EncodeRole", "PrefillRole", "RoleSpec", "build_role"]


def build_role(spec: RoleSpec, send: Send):
    """The worker's build callable (bind spec with functools.partial)."""
    return {"encode": EncodeRole, "prefill": PrefillRole, "decode": DecodeRole}[spec.kind](spec, send)
