"""Where EPD's stages run: "E:0,1 P:2 D:3" parsed into stage kind -> devices, and checked.

A placement says how many instances of each stage kind run and on which device (a GPU index,
or "cpu"), and optionally on which host ("node1/0"); stages may share a device. Mode "epd" needs
encoders, prefill and decode; mode "pd" (prefill encodes its own images) only prefill and decode.
Its GPUs are checked before any stage process starts, so a typo costs no start-up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

KINDS = ("encode", "prefill", "decode")  # in start-up order: arenas are exported by the earlier kinds
LETTERS = {"E": "encode", "P": "prefill", "D": "decode"}  # the placement syntax's names for the kinds


def _needed_kinds(mode: str) -> tuple[str, ...]:
    return KINDS if mode == "epd" else ("prefill", "decode")


def _device(text: str, item: str) -> str:
    if item == "cpu":
        return item
    if item.isdigit():
        return f"cuda:{int(item)}"
    raise ValueError(f"placement {text!r}: device {item!r} is neither a GPU index nor 'cpu'")


HOST_LABEL = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


def _host_device(text: str, item: str) -> tuple[str, str]:
    """ "node1/0" -> ("node1", "cuda:0"); "0" -> ("", "cuda:0"): "" is the orchestrator's host."""
    host, sep, device = item.rpartition("/")
    if sep and not HOST_LABEL.fullmatch(host):
        raise ValueError(f"placement {text!r}: host {host!r} in {item!r} must be a name like node0 "
                         "(a letter, then letters, digits, '_', '.' or '-')")
    return host, _device(text, device)


@dataclass(frozen=True)
class Placement:
    """Stage kind ("encode" / "prefill" / "decode") -> the device of each of its instances."""

    text: str  # as given: error messages quote it
    mode: str  # "epd" or "pd"
    devices: dict[str, tuple[str, ...]]
    # each instance's host label ("" = the orchestrator's): stages on different hosts share no
    # memory, so their arenas are read over links (ipc/linked_arena.py), never mapped
    hosts: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, mode: str) -> Placement:
        """ "E:0,1 P:2 D:3" -> encode on cuda:0 and cuda:1, prefill on cuda:2, decode on cuda:3;
        "E:a/cpu P:b/cpu D:b/cpu" -> the encoder on host a, prefill and decode on host b."""
        devices: dict[str, tuple[str, ...]] = {}
        hosts: dict[str, tuple[str, ...]] = {}
        for item in text.split():
            letter, _, listed = item.partition(":")
            kind = LETTERS.get(letter)
            if kind is None or not listed or kind in devices:
                raise ValueError(f"placement {text!r}: expected items like E:0,1 P:2 D:3 (each stage once)")
            pairs = [_host_device(text, d) for d in listed.split(",")]
            hosts[kind], devices[kind] = tuple(h for h, _ in pairs), tuple(d for _, d in pairs)
        need = _needed_kinds(mode)
        if sorted(devices) != sorted(need):
            letters = "/".join(k[0].upper() for k in need)
            raise ValueError(f"placement {text!r}: mode {mode!r} needs exactly the stages {letters}")
        return cls(text, mode, {kind: devices[kind] for kind in need}, {kind: hosts[kind] for kind in need})

    def hosts_of(self, kind: str) -> tuple[str, ...]:
        """The host label of `kind`'s instances, in index order ("" = the orchestrator's)."""
        return self.hosts.get(kind) or ("",) * len(self.of(kind))

    @property
    def multi_host(self) -> bool:
        """Some stages are on hosts other than the orchestrator's."""
        return any(h for kind in self.devices for h in self.hosts_of(kind))

    @classmethod
    def default(cls, home: str, mode: str) -> Placement:
        """Every stage on one device ("cpu" or a GPU index); two encoders in epd mode."""
        text = f"E:{home},{home} P:{home} D:{home}" if mode == "epd" else f"P:{home} D:{home}"
        return cls.parse(text, mode)

    def of(self, kind: str) -> tuple[str, ...]:
        """The devices of `kind`'s instances, in index order (none for encoders in pd mode)."""
        return self.devices.get(kind, ())

    @property
    def num_stages(self) -> int:
        return sum(len(d) for d in self.devices.values())

    def shares_kv_device(self) -> bool:
        """One prefill and one decode on one device: they can share one KV arena."""
        return (len(self.of("prefill")) == len(self.of("decode")) == 1 and self.of("prefill") == self.of("decode")
                and self.hosts_of("prefill") == self.hosts_of("decode"))

    def check_devices(self, gpu_count: int, remote_hosts: bool = False) -> None:
        """Every GPU the placement names must exist here (checked before any stage is spawned);
        remote_hosts (a cluster): only those of this host's stages (host "")."""
        letter = {kind: key for key, kind in LETTERS.items()}
        local = {letter[kind]: [d for d, h in zip(devices, self.hosts_of(kind)) if not (remote_hosts and h)]
                 for kind, devices in self.devices.items()}
        check_placement_devices(self.text, local, gpu_count)

    def by_letter(self) -> dict[str, list[str]]:
        """{"E": [...], "P": [...], "D": [...]}: the shape the command-line tools read."""
        letter = {kind: key for key, kind in LETTERS.items()}
        return {letter[kind]: list(devices) for kind, devices in self.devices.items()}


def parse_placement(text: str, mode: str) -> dict[str, list[str]]:
    """ "E:0,1 P:2 D:3" -> {"E": ["cuda:0", "cuda:1"], "P": ["cuda:2"], "D": ["cuda:3"]}."""
    return Placement.parse(text, mode).by_letter()


def check_placement_devices(text: str, devices: dict[str, list[str]], gpu_count: int) -> None:
    """Every GPU in `devices` (letter -> devices, as parse_placement returns) must exist here."""
    for device in (d for stage in devices.values() for d in stage if d.startswith("cuda:")):
        index = int(device.split(":")[1])
        if gpu_count == 0:
            raise ValueError(f"placement {text!r} names GPU {index}, but this machine has no CUDA device; "
                             "use 'cpu' (e.g. \"E:cpu,cpu P:cpu D:cpu\")")
        if index >= gpu_count:
            raise ValueError(f"placement {text!r} names GPU {index}, but this machine has {gpu_count} CUDA "
                             f"device{'s' if gpu_count > 1 else ''} (0-{gpu_count - 1})")
