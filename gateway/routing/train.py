"""Training: examples → features → :func:`fit_linear` → :class:`Router`, and leave-one-source-out validation."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from scipy import sparse

from gateway.routing.classifier import LinearFitConfig, fit_linear
from gateway.routing.errors import TrainingDataError
from gateway.routing.evaluate import EvaluationReport, evaluate_router
from gateway.routing.features import FeatureExtractor, FeatureSpec, SentenceEncoderLike
from gateway.routing.labels import Example, prompt_hash
from gateway.routing.router import Router, runtime_versions


def progress(transient: bool = True) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=transient,
    )


def featurize(
    extractor: FeatureExtractor, prompts: Sequence, *, description: str = "featurizing", show: bool = True
) -> sparse.csr_matrix:
    """CSR features of ``prompts`` with a progress bar (a second one for the embeddings of the accurate mode)."""
    if not show:
        return extractor.transform(prompts)
    with progress() as bar:
        task = bar.add_task(description, total=len(prompts))
        embed_task = None
        if extractor.spec.embedding:
            embed_task = bar.add_task(f"embedding ({extractor.spec.embedding})", total=len(prompts))

        def tick() -> Iterable:
            for p in prompts:
                yield p
                bar.advance(task)

        def embedded(n: int) -> None:
            bar.advance(embed_task, n)

        return extractor.transform(tick(), on_embedded=embedded if embed_task is not None else None)


def pair_targets(examples: Sequence[Example]) -> np.ndarray:
    """P(edge answer loses) per example (a strict loss on scores; ties in preferences count half); NaN if unknown."""
    return np.array([np.nan if e.outcome is None else e.outcome for e in examples])


def fit_router(
    examples: Sequence[Example],
    *,
    spec: FeatureSpec | None = None,
    cfg: LinearFitConfig | None = None,
    threshold: float = 0.5,
    provenance: dict[str, Any] | None = None,
    show_progress: bool = True,
    calibrate: bool = True,
    encoder: SentenceEncoderLike | None = None,
) -> Router:
    """Train a router on labelled examples.

    The classifier learns the examples' labels (e.g. difficulty percentiles); its margin is then
    calibrated to the strong-vs-weak pair outcome where the examples carry strong/weak quality, so the
    score is P(edge answer loses), and to the labels themselves otherwise.
    """
    if len(examples) < 10:
        raise TrainingDataError(f"need at least 10 labelled examples to train, got {len(examples)}")
    spec = spec or FeatureSpec()
    cfg = cfg or LinearFitConfig()
    extractor = FeatureExtractor(spec, encoder=encoder)
    x = featurize(extractor, [e.prompt for e in examples], show=show_progress)
    y = np.array([e.label for e in examples])
    pair = pair_targets(examples)
    use_pair = int(np.isfinite(pair).sum()) >= 20 and 0 < np.nanmean(pair) < 1
    model, platt = fit_linear(
        x, y, hash_dim=spec.hash_dim, cfg=cfg, platt_target=pair if use_pair else None, calibrate=calibrate
    )
    sources = sorted({e.source for e in examples})
    manifest = {
        "score_semantics": (
            "probability that the edge (weak) answer loses to the cloud (strong) answer; ranking learnt from the "
            "training labels, probability calibrated (Platt, out-of-fold) on the strong-vs-weak outcomes"
            if use_pair
            else "calibrated training label (no strong/weak outcomes were given): higher = more in need of the cloud"
        ),
        "training": {
            **(provenance or {}),
            "num_examples": len(examples),
            "sources": sources,
            "fit": asdict(cfg),
            "platt": platt,
            "calibrated_on": "pair outcomes" if use_pair else "labels",
        },
        "versions": runtime_versions(),
    }
    hashes = np.array(sorted({prompt_hash(e.prompt) for e in examples}), dtype=np.uint64)
    return Router(
        spec, model, threshold=threshold, manifest=manifest, training_hashes=hashes, encoder=extractor.encoder
    )


def leave_one_source_out(
    examples: Sequence[Example],
    *,
    spec: FeatureSpec | None = None,
    cfg: LinearFitConfig | None = None,
    eval_examples: dict[str, list[Example]] | None = None,
    show_progress: bool = True,
    encoder: SentenceEncoderLike | None = None,
    bootstrap: int = 0,
) -> list[EvaluationReport]:
    """Train on all sources but one, evaluate on the held-out one (deduplicated against training), for each.

    ``eval_examples`` optionally gives, per source, the examples to evaluate on (they need strong/weak
    quality); by default the training examples of that source are used.
    """
    sources = sorted({e.source for e in examples})
    if len(sources) < 2:
        raise TrainingDataError("leave-one-source-out needs at least two sources")
    reports = []
    for held_out in sources:
        train = [e for e in examples if e.source != held_out]
        test = (eval_examples or {}).get(held_out) or [e for e in examples if e.source == held_out]
        # Ranking metrics do not depend on the Platt step, so skip its 5 extra fits.
        router = fit_router(train, spec=spec, cfg=cfg, show_progress=False, calibrate=False, encoder=encoder)
        reports.append(
            evaluate_router(
                held_out, test, router.score_batch, train_hashes=router.training_hashes, bootstrap=bootstrap
            )
        )
        if show_progress:
            r = reports[-1].methods
            apgrs = "  ".join(f"{name} {m.apgr:.3f}" for name, m in r.items())
            print(f"  held out {held_out:14s} APGR: {apgrs}")
    return reports


def cross_validate(
    examples: Sequence[Example],
    *,
    num_folds: int = 5,
    spec: FeatureSpec | None = None,
    cfg: LinearFitConfig | None = None,
    seed: int = 0,
    encoder: SentenceEncoderLike | None = None,
    bootstrap: int = 0,
) -> EvaluationReport:
    """K-fold cross-validation inside one data set: out-of-fold scores of every prompt, evaluated together.

    Within-source CV flatters every method (train and test share a distribution); prefer
    :func:`leave_one_source_out` when there are several sources.
    """
    if num_folds < 2 or len(examples) < 2 * num_folds:
        raise TrainingDataError(f"{num_folds}-fold CV needs num_folds >= 2 and at least {2 * num_folds} examples")
    order = np.random.default_rng(seed).permutation(len(examples))
    folds = np.array_split(order, num_folds)
    oof = np.zeros(len(examples))
    for fold in folds:
        held = set(fold.tolist())
        train = [e for i, e in enumerate(examples) if i not in held]
        router = fit_router(train, spec=spec, cfg=cfg, show_progress=False, calibrate=False, encoder=encoder)
        oof[fold] = router.score_batch([examples[i].prompt for i in fold])
    lookup = {id(e.prompt): s for e, s in zip(examples, oof, strict=True)}
    name = "+".join(sorted({e.source for e in examples})) + f" ({num_folds}-fold CV)"
    return evaluate_router(
        name, list(examples), lambda prompts: np.array([lookup[id(p)] for p in prompts]), bootstrap=bootstrap
    )
