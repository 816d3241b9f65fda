"""The ``sidecache`` command: dispatch to a stage's ``main`` and turn errors into exit codes."""

from __future__ import annotations

import importlib
import logging
import sys

from pipeline.errors import SidecacheError
from pipeline.logs import configure_logging

COMMANDS = {
    "cache": "stages.cache",
    "inspect": "stages.inspect",
    "verify": "stages.verify",
    "train": "stages.train",
    "predict": "stages.predict",
    "sweep": "stages.sweep",
    "bench": "stages.bench",
    "stage": "stages.stage",
}
USAGE = "usage: sidecache {" + ",".join(COMMANDS) + "} [options]   (sidecache COMMAND -h for help)"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"sidecache: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    configure_logging()
    module = importlib.import_module(COMMANDS[command])
    try:
        return int(module.main(rest))
    except SidecacheError as exc:
        logging.getLogger("sidecache").error("%s: %s", type(exc).__name__, exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
