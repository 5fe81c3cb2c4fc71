"""``python -m bench.peers [PEERS] [PROTOCOL_JSON]``: measure the peers alone and print their JSON.

    python -m bench.peers                                   # default peers plus any other installed one
    python -m bench.peers ortgenai,llamacpp '{"repeats": 5}'
"""

from __future__ import annotations

import json
import sys

from rich.console import Console

from .api import detect_peers, run_peers
from .setup import PEERS


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    installed = detect_peers()
    peers = args[0].split(",") if args else [p for p, spec in PEERS.items() if spec.default or installed[p]]
    protocol = json.loads(args[1]) if len(args) > 1 else {}
    print(json.dumps(run_peers(peers, protocol, None, Console(stderr=True)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
