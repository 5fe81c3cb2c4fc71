"""Peer engines that ``hybrid-gateway bench edge`` measures beside ours, each in its own venv.

    python bench/peers/setup.py --peers ortgenai,transformers     # once: venvs + models
    from bench.peers import run_peers                              # then from the bench command

``setup.py`` installs, ``run_peer.py`` measures inside a peer's venv, ``api.py`` runs it from the main venv.
"""

from .api import detect_peers, install_hint, run_peers
from .run_peer import DEFAULT_PROTOCOL, validate_protocol, validate_result
from .setup import PEERS, default_root

__all__ = [
    "DEFAULT_PROTOCOL",
    "PEERS",
    "default_root",
    "detect_peers",
    "install_hint",
    "run_peers",
    "validate_protocol",
    "validate_result",
]
