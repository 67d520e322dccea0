"""Import directions between engine/, graphs/, epd_kernels/ and ipc/ (read from source with ast: no
imports run, lazy ones inside functions count too).

The layers, lowest first: kernels (ops, no knowledge of requests), graphs (capture and replay of
the model's steps), ipc mechanisms (arenas, migration, channels, parent watch, connections,
messages), engine. A forbidden arrow points up or sideways: kernels -> engine/graphs/ipc,
graphs -> engine.request or ipc, an ipc mechanism -> engine, engine -> ipc other than the
orchestrator's use of the modules it needs. Arrows that exist today and that issue 11 removes
are in ALLOWED_TODAY with the item that removes each; the test fails on any new forbidden arrow
and on an allowed one that is gone, so that list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "graphs", "epd_kernels", "ipc")
IPC_MECHANISMS = ("ipc.arena", "ipc.busy_board", "ipc.migration", "ipc.channel", "ipc.parent_watch", "ipc.connections",
                  "ipc.worker", "ipc.peer_link", "ipc.linked_arena")
# The engine modules that drive processes, and what they may use of ipc: the orchestrator spawns
# worker shells (here, or as Ray actors) and talks over channels; the stage roles own and map
# arenas, or read them over links, and pull blocks.
ORCHESTRATOR = ("engine.epd", "engine.stage_handles", "engine.roles", "engine.switching", "engine.dynamic",
                "engine.ray_stages")
ORCHESTRATOR_IPC = ("ipc.arena", "ipc.busy_board", "ipc.byte_arena", "ipc.channel", "ipc.migration", "ipc.worker",
                    "ipc.peer_link", "ipc.linked_arena")

# (importer, imported) -> the issue-11 item that removes the arrow.
ALLOWED_TODAY: dict[tuple[str, str], str] = {
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imported(node: ast.AST, importer: str, is_package: bool) -> list[str]:
    """The modules one import statement names (`from ipc import arena` names ipc.arena)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: resolved against the importer's package
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    subs = [f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")]
    return subs or [base]


def import_arrows() -> set[tuple[str, str]]:
    """(importer, imported) for every import between two different top-level packages of ours."""
    arrows = set()
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            importer = _module_name(path)
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                for imported in _imported(node, importer, path.name == "__init__.py"):
                    top = imported.split(".")[0]
                    if top in PACKAGES and top != package:
                        arrows.add((importer, imported))
    return arrows


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def forbidden(importer: str, imported: str) -> str | None:
    """Why the arrow importer -> imported breaks the layering, or None if it may exist."""
    if _within(importer, ("epd_kernels",)) and _within(imported, ("engine", "graphs", "ipc")):
        return "kernels import nothing above them"
    if _within(importer, ("graphs",)) and _within(imported, ("engine.request", "ipc")):
        return "graphs know no requests and no processes"
    if _within(importer, IPC_MECHANISMS) and _within(imported, ("engine",)):
        return "ipc mechanisms know nothing of the engine"
    if _within(importer, ("engine",)) and _within(imported, ("ipc",)):
        if _within(importer, ORCHESTRATOR) and _within(imported, ORCHESTRATOR_IPC):
            return None
        return "engine reaches ipc only through the orchestrator's modules"
    return None


def test_no_new_forbidden_import_arrow() -> None:
    bad = {arrow: why for arrow in import_arrows() if (why := forbidden(*arrow)) and arrow not in ALLOWED_TODAY}
    assert not bad, "forbidden imports:\n" + "\n".join(f"  {a} -> {b}: {why}" for (a, b), why in sorted(bad.items()))


def test_allowlist_only_shrinks() -> None:
    """An allowed arrow that no longer exists must leave ALLOWED_TODAY (its item is done), and
    every entry must really be forbidden (the list holds no arrow the rules permit)."""
    arrows = import_arrows()
    gone = [arrow for arrow in ALLOWED_TODAY if arrow not in arrows]
    assert not gone, f"remove from ALLOWED_TODAY (no longer imported): {gone}"
    assert all(forbidden(*arrow) for arrow in ALLOWED_TODAY)


def test_the_scan_sees_todays_arrows() -> None:
    """Guards the scanner itself: module-level, lazy (inside a function) and `from pkg import mod`
    imports are all found."""
    arrows = import_arrows()
    assert ("engine.epd", "ipc.worker") in arrows  # module level
    assert ("ipc.serve_cli", "engine.epd") in arrows  # inside a function
    assert ("engine.runner", "graphs.decode_graphs") in arrows
    assert not any(a.split(".")[0] == b.split(".")[0] for a, b in arrows)  # only arrows between packages


def test_rules_on_examples() -> None:
    assert forbidden("epd_kernels.attn_varlen", "engine.request")
    assert forbidden("epd_kernels", "ipc.arena")
    assert forbidden("graphs.vision_graphs", "engine.request")
    assert forbidden("graphs.decode_graphs", "ipc.channel")
    assert forbidden("ipc.arena", "engine.config") and forbidden("ipc.connections", "engine")
    assert forbidden("engine.llm", "ipc.arena") and forbidden("engine.epd", "ipc.server")
    assert forbidden("engine.epd", "ipc.worker") is None and forbidden("engine.roles", "ipc.arena") is None
    assert forbidden("ipc.worker", "engine.roles")  # the shell hosts any role: it knows none
    assert forbidden("engine.runner", "ipc.arena")  # the runner is given its arenas
    assert forbidden("ipc.server", "engine.epd") is None  # the RPC server sits above the engine
    assert forbidden("engine.runner", "graphs.decode_graphs") is None
    assert forbidden("graphs.decode_graphs", "engine.models.llama") is None
    assert forbidden("ipc.arena", "epd_kernels") is None
