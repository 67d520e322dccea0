"""What every command-line driver shares: one-line errors with exit status 2, Ctrl-C as 130,
`--help` with defaults, logging set-up, and the device checks made before any model loads.

    def main(argv: list[str] | None = None) -> int: ...
    sys.exit(run_main(main))
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

EXIT_BAD_INPUT = 2  # argparse's status for usage errors; ours for every bad input
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
PROJECT_LOGGERS = ("engine", "graphs", "ipc", "epd_kernels")
PLACEMENT_HELP = (
    'stage instances and their devices: "E:<dev>[,<dev>...] P:<dev>[,...] D:<dev>[,...]", where <dev> is a '
    'GPU index or "cpu" (one instance per entry), e.g. "E:0,1 P:2 D:3" or, on the CPU, "E:cpu,cpu P:cpu D:cpu"; '
    'an entry "<host>/<dev>" puts it on another host (a Ray node with --cluster; without, a host of its own on '
    'this machine: nothing shared across hosts), e.g. "E:node0/0 P:node1/0 D:node1/1"; '
    'mode pd takes only P and D. Default: two encoders, one prefill, one decode, all on --device'
)

log = logging.getLogger(__name__)


class CLIError(ValueError):
    """A bad command-line value; the message names the flag and the limit."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default and keeps the module docstring's layout. A help text that
    already says its default, or a default of None / False / [] (an unset flag), gets no suffix."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == []
        if "default" in text or unset or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one `error: ...` line on stderr for a bad flag (no usage dump), status 2."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (a path, a flag, a config value), not a bug."""
    from engine.config import ConfigError
    from engine.images import ImageError
    from engine.loader import LoadError
    from engine.sampling import RequestError

    errors: list[type[BaseException]] = [CLIError, ConfigError, ImageError, LoadError, RequestError, ValueError,
                                         FileNotFoundError, NotADirectoryError, PermissionError]
    server = sys.modules.get("ipc.server")  # AddressInUse can only come from a driver that imported it
    errors += [getattr(server, name) for name in ("AddressInUse", "AddressError") if hasattr(server, name)]
    return tuple(errors)


def run_main(main: Callable[[], int | None]) -> int:
    """Run a driver's main: its return value is the exit status; bad input (see _input_errors)
    prints one `error: <message>` line and gives 2; Ctrl-C gives 130; neither prints a traceback
    (run with --log-level DEBUG to log one)."""
    try:
        return main() or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if not isinstance(e, _input_errors()):
            raise
        log.debug("bad input", exc_info=True)
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


def setup_logging(level: str) -> None:
    """The project's loggers at `level` on stderr; other libraries stay at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)


def add_log_level(parser: argparse.ArgumentParser, default: str = "INFO") -> None:
    parser.add_argument("--log-level", default=default, type=str.upper, choices=LOG_LEVELS,
                        help="log level of the engine's loggers (stderr)")


def positive_int(flag: str, value: int | None, upper: int | None = None) -> None:
    """Raise CLIError unless value is None or in [1, upper]."""
    if value is None:
        return
    if value < 1 or (upper is not None and value > upper):
        limit = f"in [1, {upper}]" if upper is not None else ">= 1"
        raise CLIError(f"{flag} = {value}; must be {limit}")


def int_list(flag: str, text: str, upper: int | None = None) -> list[int]:
    """Parse "1,8,32" for `flag`: positive integers (at most upper)."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise CLIError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,8,32") from None
    for value in values:
        positive_int(flag, value, upper)
    return values


def dtype_arg(name: str) -> str:
    """argparse type for --dtype: auto or a dtype engine.config accepts."""
    from engine.config import ConfigError, parse_dtype

    if name == "auto":
        return name
    try:
        parse_dtype(name)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return name


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_gpu(flag: str, value: str, index: int) -> None:
    count = _cuda_devices()
    if count == 0:
        raise CLIError(f"{flag} {value!r} needs a CUDA GPU, and this machine has none (torch sees no CUDA "
                       "device); use cpu")
    if index >= count:
        raise CLIError(f"{flag} {value!r}: GPU {index} does not exist; this machine has {count} (0-{count - 1})")


def check_device(device: str | None, backend: str) -> None:
    """--device and --backend against this machine, before any model loads."""
    import torch

    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError) as e:
            raise CLIError(f"--device {device!r}: expected cpu, cuda or cuda:N") from e
        if dev.type not in ("cpu", "cuda"):
            raise CLIError(f"--device {device!r}: expected cpu, cuda or cuda:N")
        if dev.type == "cuda":
            _check_gpu("--device", device, dev.index or 0)
    if backend == "cuda":
        from epd_kernels import cuda_available

        if device is not None and torch.device(device).type == "cpu":
            raise CLIError("--backend cuda runs on a GPU; with --device cpu use --backend torch (or auto)")
        if _cuda_devices() == 0:
            raise CLIError("--backend cuda needs a CUDA GPU, and this machine has none; use --backend torch")
        if not cuda_available():
            raise CLIError("--backend cuda: the CUDA extension epd_kernels._epd_C is not built "
                           "(python -m epd_kernels.build); or use --backend torch")


def require_cuda_backend(what: str) -> None:
    """For drivers that only run on the cuda backend (the GPU benchmarks): a GPU and the built
    extension, or CLIError saying which is missing."""
    from epd_kernels import cuda_available

    if _cuda_devices() == 0:
        raise CLIError(f"{what}: runs on a CUDA GPU only, and this machine has none")
    if not cuda_available():
        raise CLIError(f"{what}: runs on the cuda backend only; build the extension (python -m epd_kernels.build)")


def check_placement(placement: str, mode: str, cluster: bool = False) -> dict[str, list[str]]:
    """Parse --placement for `mode` and check that its GPUs exist (the orchestrator's own
    checks, Placement.parse and check_devices, as one-line CLI errors; with a cluster, those
    of the stages on this host only)."""
    from engine.placement import Placement

    try:
        where = Placement.parse(placement, mode)
        where.check_devices(_cuda_devices(), remote_hosts=cluster)
    except ValueError as e:
        raise CLIError(f"--placement: {e}") from e
    return where.by_letter()
