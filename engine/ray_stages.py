"""Stages on the nodes of a Ray cluster (issue 18; the optional `ray` extra).

    EPDEngine(model, placement="E:node0/0,node0/1 P:node1/0 D:node1/1", cluster="10.0.0.1:6379")

A placement's host label names a Ray node by a custom resource of that name (`ray start ...
--resources='{"node1": 100}'`). The engine reserves one placement group for its stages, a bundle
per (host, device) of the placement: {label: 0.01} pins it to the node, plus {"GPU": 1} for a GPU.
Each stage runs as an actor in its bundle; stages that share a device share its bundle (a fraction
of its GPU each), so `E:node0/0,node0/0` puts two encoders on one GPU and `node0/0`, `node0/1` on
two. Ray picks which GPU a bundle gets: the index tells a host's devices apart, it is not kept
(each actor sees its GPU as cuda:0). What a node cannot hold (more GPUs than it has) is refused
at start; a group the cluster cannot reserve now (GPUs held by others) fails after PLACE_TIMEOUT_S.
The actor runs the same worker shell (ipc.worker.run_worker) over two socket connections to the
orchestrator (multiprocess.connection, authkey) in place of pipes, so the messages and the
protocol are those of a local stage. Tensors never go through Ray: embeddings and KV blocks
cross hosts over links (ipc/linked_arena.py), image bytes in the tasks. A lost actor is a closed
connection, the event a dead local stage raises: its requests fail or are routed around, the
other stages serve on.
"""

from __future__ import annotations

import functools
import os
import secrets
from collections import Counter
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from engine.placement import Placement
from engine.roles import RoleSpec, build_role
from engine.stage_handles import StageHandle
from ipc.channel import Inbox

CONNECT_TIMEOUT_S = 300.0  # an actor's start (a worker process, imports, its connections)
PLACE_TIMEOUT_S = 120.0  # the placement group's reservation
LABEL_SHARE = 0.01  # of a node's label resource, per bundle


def connect(address: str, where: Placement) -> dict[str, str]:
    """Join the cluster at `address` (once per process): {host label: node IP} for every alive
    node's custom resources, and "" for this process's node (where actors connect to).
    ValueError if the placement names a host that is no node's resource."""
    import ray

    if not ray.is_initialized():
        # the actors import this engine: from the nodes' installs, else from this checkout (a
        # shared filesystem, as on one machine)
        root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(address=address, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    labels: dict[str, str] = {}
    gpus: dict[str, float] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for resource in node.get("Resources", {}):
                if not resource.startswith(("node:", "CPU", "GPU", "memory", "object_store_memory", "accelerator")):
                    labels[resource] = node["NodeManagerAddress"]
                    gpus[resource] = node["Resources"].get("GPU", 0)
    named = {h for kind in where.devices for h in where.hosts_of(kind) if h}
    if named - set(labels):
        raise ValueError(f"placement {where.text!r}: host(s) {sorted(named - set(labels))} name no node of "
                         f"the cluster at {address} (its nodes' custom resources: {sorted(labels)})")
    for host in sorted(named):
        want = len({d for h, d in _pairs(where) if h == host and d != "cpu"})
        if want > gpus[host]:
            raise ValueError(f"placement {where.text!r}: host {host} is given {want} GPU(s), but its node has "
                             f"{gpus[host]:g}")
    return {**labels, "": ray.util.get_node_ip_address()}


def free_port_on(host: str, address: str) -> int:
    """A TCP port free now at `address` on the node labelled `host` (a link's rank 0 listens
    there): asked of that node by a task, since a port free on the orchestrator's machine may be
    taken on another."""
    import ray

    return ray.get(_port_asker(host).remote(address), timeout=CONNECT_TIMEOUT_S)


@functools.cache
def _port_asker(host: str):
    """ipc.peer_link.free_port as a Ray task pinned to the node labelled `host` (made once per host)."""
    import ray

    from ipc.peer_link import free_port

    return ray.remote(num_cpus=0, resources={host: 0.0001})(free_port)


def _pairs(where: Placement) -> list[tuple[str, str]]:
    """(host, device) of each stage the placement puts on a named host, in stage order."""
    return [(h, d) for kind in where.devices for h, d in zip(where.hosts_of(kind), where.of(kind)) if h]


class StageGroup:
    """The engine's placement group: a bundle per (host, device) of the placement's named hosts;
    options() places a stage's actor in its bundle; close() gives the reservation back."""

    def __init__(self, where: Placement) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        stages = _pairs(where)
        self.sharing = Counter(stages)  # stages per (host, device): each takes that share of the bundle
        self.bundle_of = {pair: i for i, pair in enumerate(dict.fromkeys(stages))}
        self.bundles = [{host: LABEL_SHARE, **({"GPU": 1} if device != "cpu" else {})}
                        for host, device in self.bundle_of]
        self.group = placement_group(self.bundles, strategy="PACK")
        ready, _ = ray.wait([self.group.ready()], timeout=PLACE_TIMEOUT_S)
        if not ready:
            remove_placement_group(self.group)
            raise RuntimeError(f"placement {where.text!r}: the cluster could not reserve {self.bundles} within "
                               f"{PLACE_TIMEOUT_S:.0f} s (its resources free now: {ray.available_resources()})")

    def options(self, host: str, device: str) -> dict:
        """The actor options of a stage on (host, device): its share of the bundle, in the bundle."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        share = 1.0 / self.sharing[(host, device)]
        bundle = self.bundle_of[(host, device)]
        strategy = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=bundle)
        return {"num_gpus": share if device != "cpu" else 0, "resources": {host: LABEL_SHARE * share},
                "scheduling_strategy": strategy}

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None


def _actor_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class StageActor:
        """One stage on a node: serves its role until Shutdown or the orchestrator's end."""

        def run(self, address: tuple, authkey: bytes, build, name: str, torch_threads: int) -> None:
            from multiprocess.connection import Client

            from ipc.worker import run_worker

            inbox = Client(address, authkey=authkey)
            outbox = Client(address, authkey=authkey)
            try:
                run_worker(build, name, torch_threads, inbox, outbox)
            except SystemExit:  # run_worker's way to end after reporting a crash
                pass
            finally:
                inbox.close()
                outbox.close()

    return StageActor


class RayProcess:
    """A Ray actor as StageHandle.process: alive while its run task is; kill / terminate end it."""

    pid = None

    def __init__(self, actor: Any, task: Any) -> None:
        self.actor, self.task = actor, task
        self._killed = False  # by terminate / kill: exit code -9
        self._released = False  # the actor given back after its task ended

    def is_alive(self) -> bool:
        import ray

        if self._killed:
            return False
        done, _ = ray.wait([self.task], timeout=0)
        return not done

    @property
    def exitcode(self) -> int | None:
        import ray

        if self.is_alive():
            return None
        if self._killed:
            return -9
        try:
            ray.get(self.task, timeout=0)
        except Exception:
            return 1
        return 0

    def terminate(self) -> None:
        import ray

        ray.kill(self.actor)
        self._killed = True

    kill = terminate

    def join(self, timeout: float | None = None) -> None:
        """Wait for the run task; then give the actor back (it holds its node's resources). The
        exit code stays the task's."""
        import ray

        ray.wait([self.task], timeout=timeout)
        if not self.is_alive() and not self._released:
            ray.kill(self.actor)
            self._released = True


def spawn_ray_stage(ctx, spec: RoleSpec, device: str, listen_host: str, group: StageGroup) -> StageHandle:
    """Start spec's role as an actor in its bundle of `group` (on the node whose resource is
    spec.host); the handle the orchestrator keeps for it (its connections accepted here, on
    listen_host)."""
    from multiprocess.connection import Listener

    authkey = secrets.token_bytes(32)
    listener = Listener((listen_host, 0), authkey=authkey)
    try:
        options = group.options(spec.host, device)
        if device != "cpu":  # Ray gives the bundle one GPU of its node, visible to its actors as cuda:0
            spec = replace(spec, config=replace(spec.config, device="cuda:0"))
        actor = _actor_class().options(name=None, **options).remote()
        task = actor.run.remote(listener.address, authkey, partial(build_role, spec), spec.name,
                                spec.config.torch_threads)
        listener._listener._socket.settimeout(CONNECT_TIMEOUT_S)
        try:
            inbox_conn = listener.accept()
            outbox_conn = listener.accept()
        except TimeoutError as e:
            raise RuntimeError(f"stage {spec.name}: its actor on {spec.host} did not connect within "
                               f"{CONNECT_TIMEOUT_S:.0f} s") from e
    finally:
        listener.close()
    inbox = Inbox(ctx, spec.name, writer=inbox_conn)
    inbox.started()
    return StageHandle(spec.kind, spec.index, device, RayProcess(actor, task), inbox, outbox_conn, host=spec.host)
