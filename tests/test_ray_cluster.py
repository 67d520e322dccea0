"""EPD on a local two-node Ray cluster (issue 18): `ray start --head` plus a second `ray start
--address`, on loopback, CPU only, each node named by a custom resource. The encoder runs on one
node, prefill and decode on the other, as actors; across the node boundary only links
(ipc/linked_arena.py) carry tensors, never CUDA IPC or /dev/shm. Greedy output equals the
aggregated engine's; a killed actor is routed around; the cluster is stopped at the end.
Skipped where Ray is not installed (the `ray` extra; CI installs it)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import LLM
from engine.epd import EPDEngine
from tests.test_epd import SP, _requests

pytest.importorskip("ray")
# the ray command of this Python's environment (a venv's bin may not be on PATH), else PATH's
_BESIDE = Path(sys.executable).with_name("ray")
RAY = str(_BESIDE) if _BESIDE.exists() else shutil.which("ray")
pytestmark = pytest.mark.skipif(RAY is None, reason="the ray command is not on PATH")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str) -> None:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([RAY, *args], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, f"ray {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine, labelled node0 and node1; stopped afterwards."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=4", "--disable-usage-stats"]
    try:
        _ray("start", "--head", f"--port={port}", "--include-dashboard=false", '--resources={"node0": 100}', *common)
        _ray("start", f"--address={address}", '--resources={"node1": 100}', *common)
        yield address
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def _node_of(label: str) -> str:
    import ray

    return next(n["NodeID"] for n in ray.nodes() if n.get("Alive") and label in n.get("Resources", {}))


def _bundle_nodes(group) -> list[str]:
    import ray

    where = ray.util.placement_group_table(group)["bundles_to_node_id"]
    return [where[i] for i in sorted(where)]


def _expected(tiny_llava: Path) -> list[list[int]]:
    return [o.token_ids for o in LLM(tiny_llava, backend="torch", device="cpu").generate(_requests(), SP)]


def test_encoder_on_one_node_prefill_and_decode_on_the_other(cluster: str, tiny_llava: Path) -> None:
    engine = EPDEngine(tiny_llava, placement="E:node0/cpu P:node1/cpu D:node1/cpu", backend="torch", device="cpu",
                       cluster=cluster)
    try:
        assert {name: h.host for name, h in engine.stages.items()} == {
            "encode0": "node0", "prefill0": "node1", "decode0": "node1"}
        assert engine.stages["prefill0"].ready["mm_linked_from"] == [0], "the only path across: a link"
        assert engine.image_bytes is None, "no shared memory across the nodes: image bytes go in the tasks"
        group = engine.stage_group.group
        assert engine.stage_group.bundles == [{"node0": 0.01}, {"node1": 0.01}], "a bundle per (host, device)"
        assert _bundle_nodes(group) == [_node_of("node0"), _node_of("node1")], "each bundle on its label's node"
        outputs = engine.generate(_requests(), SP)
        assert [o.token_ids for o in outputs] == _expected(tiny_llava)
        with_images = [o for o, r in zip(outputs, _requests()) if r.images]
        assert all(o.handoff["mm_bytes"] > 0 for o in with_images)
    finally:
        engine.shutdown()
    assert {name: proc.exitcode for name, proc in engine.procs.items()} == dict.fromkeys(engine.procs, 0)
    import ray

    assert ray.util.placement_group_table(group)["state"] == "REMOVED", "the reservation is given back"


def test_a_killed_actor_is_routed_around(cluster: str, tiny_llava: Path) -> None:
    import ray

    expected = _expected(tiny_llava)
    engine = EPDEngine(tiny_llava, placement="E:node0/cpu,node1/cpu P:node1/cpu D:node1/cpu", backend="torch",
                       device="cpu", cluster=cluster)
    try:
        actors = {name: h.process.actor for name, h in engine.stages.items()}
        assert all(a is not None for a in actors.values()), "every stage is an actor"
        # three stages share node1's bundle (a third of it each), encode0 has node0's
        assert engine.stage_group.sharing == {("node0", "cpu"): 1, ("node1", "cpu"): 3}
        assert _bundle_nodes(engine.stage_group.group) == [_node_of("node0"), _node_of("node1")]
        # encode0's arena is on the other node: read over a link; encode1's is mapped, as on one host
        assert engine.stages["prefill0"].ready["mm_linked_from"] == [0]
        assert engine.stages["prefill0"].ready["mm_in_place_from"] == [1]
        outputs = engine.generate(_requests(), SP)
        assert [o.token_ids for o in outputs] == expected
        # a lost actor: its connection closes, its requests go to the other encoder
        ray.kill(actors["encode0"])
        deadline = time.monotonic() + 60
        while engine.procs["encode0"].is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        outputs = engine.generate(_requests(), SP)
        assert [o.token_ids for o in outputs] == expected
        assert engine.stages["encode0"].dead
    finally:
        engine.shutdown()
    codes = {name: proc.exitcode for name, proc in engine.procs.items()}
    assert codes["encode0"] not in (0, None) and codes == {**codes, "encode1": 0, "prefill0": 0, "decode0": 0}, codes


def test_a_host_that_names_no_node_is_refused(cluster: str, tiny_llava: Path) -> None:
    with pytest.raises(ValueError, match=r"host\(s\) \['node7'\] name no node of the cluster"):
        EPDEngine(tiny_llava, placement="E:node7/cpu P:node1/cpu D:node1/cpu", backend="torch", device="cpu",
                  cluster=cluster)


def test_more_gpus_than_a_node_has_is_refused(cluster: str, tiny_llava: Path) -> None:
    """The nodes here have no GPU: a GPU stage on one is refused at start, naming host and counts."""
    with pytest.raises(ValueError, match=r"host node0 is given 2 GPU\(s\), but its node has 0"):
        EPDEngine(tiny_llava, placement="E:node0/0,node0/1 P:node1/cpu D:node1/cpu", backend="torch", device="cpu",
                  cluster=cluster)


def test_a_role_switch_across_nodes(cluster: str, tiny_llava: Path) -> None:
    """encode1 on node0 becomes a prefill there: its LM copied over gloo from prefill0 on node1,
    which listens on a port asked of node1 itself (ray_stages.free_port_on); decode0 (node1)
    then pulls prefill1's KV over a link. Greedy tokens equal aggregated's."""
    expected = _expected(tiny_llava) * 2
    engine = EPDEngine(tiny_llava, placement="E:node0/cpu,node0/cpu P:node1/cpu D:node1/cpu", backend="torch",
                       device="cpu", cluster=cluster, kv_cache_tokens=4096, mm_cache=False)
    try:
        record = engine.switch_role("encode", 1, "prefill")
        assert record["weights"] == "copied from prefill0 on host node1 over gloo"
        assert engine.stages["prefill1"].host == "node0"
        outputs = engine.generate(_requests() * 2, SP)
        assert [o.token_ids for o in outputs] == expected
        assert any(o.handoff["kv_bytes"] > 0 for o in outputs), "some KV pulled from prefill1 across the nodes"
    finally:
        engine.shutdown()
    assert {name: proc.exitcode for name, proc in engine.procs.items()} == dict.fromkeys(engine.procs, 0)
