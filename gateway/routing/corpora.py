"""Readers for the public routing data in ``../shared/routing-data`` (see its README for licences).

Each source becomes :class:`~gateway.routing.labels.Record` s with per-model ``scores`` (for difficulty
labels) and the quality of the RouteLLM pair, gpt-4-1106-preview (strong) vs Mixtral-8x7B (weak), for
evaluation:

- ``arena-hard``  (Apache-2.0, the only source the shipped router may train on): GPT-4-judged 1–10
  scores of 15 models on 300 prompts.
- ``alpaca-eval`` (CC BY-NC): each model's probability of beating gpt-4-1106 (preference − 1). The pair's
  quality is (1 − w, w) with w Mixtral's win probability.
- ``arc-challenge``, ``mbpp``, ``winogrande`` (RouterBench via RouterDC, no licence): 0/1 correctness;
  few-shot examples are stripped, keeping the last question.
"""

from __future__ import annotations

import ast
import csv
import json
import os
from pathlib import Path

from gateway.routing.errors import TrainingDataError
from gateway.routing.labels import Record

STRONG_MODEL = "gpt-4-1106-preview"
WEAK_MODEL = "Mixtral-8x7B"
# Frontier models are left out of the difficulty label: their failures say little about an edge model.
FRONTIER_MODELS: tuple[str, ...] = ("gpt-4-1106-preview", "gpt-4-0314", "gpt4_1106_preview", "claude-2.1", "claude-v2")
SOURCES: tuple[str, ...] = ("arena-hard", "alpaca-eval", "arc-challenge", "mbpp", "winogrande")
PERMISSIVE_SOURCES: tuple[str, ...] = ("arena-hard",)
PROVENANCE: dict[str, dict[str, str]] = {
    "arena-hard": {
        "repository": "lmarena/arena-hard-auto",
        "commit": "4a705dd6963f777aba2ae79259e3013934e6e012",
        "files": "data/arena-bench-v1/question.jsonl, data/arena-bench-v1/model_judgment/*.jsonl",
        "licence": "Apache-2.0",
    },
    "alpaca-eval": {
        "repository": "tatsu-lab/alpaca_eval",
        "commit": "cd543a149df89434d8a54582c0151c0b945c3d20",
        "files": "results/*/*/annotations.json",
        "licence": "data CC BY-NC 4.0 (not for the shipped router)",
    },
    **{
        name: {
            "repository": "shuhao02/RouterDC (RouterBench subsets)",
            "commit": "0e63989c5bf4363330b8a4616386e3f7f116d9f8",
            "files": f"datasets/routerbench_zs/{stem}_{{train,test}}.csv",
            "licence": "none stated (not for the shipped router)",
        }
        for name, stem in (("arc-challenge", "arc_challenge"), ("mbpp", "mbpp"), ("winogrande", "winograde"))
    },
}

_ROUTERBENCH = {"arc-challenge": "arc_challenge", "mbpp": "mbpp", "winogrande": "winograde"}
_REPO_ROOT = Path(__file__).resolve().parents[2]


def find_routing_data(root: str | Path | None = None) -> Path:
    """``root``, else $HYBRID_GATEWAY_ROUTING_DATA, else ``../shared/routing-data`` beside the repo root."""
    candidates = [root, os.environ.get("HYBRID_GATEWAY_ROUTING_DATA"), _REPO_ROOT.parent / "shared" / "routing-data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "MANIFEST.tsv").is_file():
            return Path(candidate)
    raise TrainingDataError(f"routing-data not found (looked in {[str(c) for c in candidates if c]})")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_arena_hard(root: Path) -> list[Record]:
    base = root / "arena-hard-auto" / "data" / "arena-bench-v1"
    questions = {q["question_id"]: q["turns"][0] for q in _read_jsonl(base / "question.jsonl")}
    scores: dict[str, dict[str, float]] = {qid: {} for qid in questions}
    for path in sorted((base / "model_judgment").glob("*.jsonl")):
        for row in _read_jsonl(path):
            score = row.get("score")
            if isinstance(score, (int, float)) and score >= 1 and row["question_id"] in scores:
                scores[row["question_id"]][row["model"].split("/")[-1]] = float(score)
    records = []
    for qid, prompt in questions.items():
        s = scores[qid]
        weak = s.get("Mixtral-8x7B-Instruct-v0.1")
        records.append(
            Record(
                prompt=prompt,
                source="arena-hard",
                id=qid,
                scores=s,
                strong_quality=s.get(STRONG_MODEL),
                weak_quality=weak,
            )
        )
    return records


def load_alpaca_eval(root: Path) -> list[Record]:
    by_prompt: dict[str, Record] = {}
    for path in sorted((root / "alpaca_eval" / "results").glob("*/*/annotations.json")):
        model = path.parts[-3]
        for row in json.loads(path.read_text(encoding="utf-8")):
            try:
                weak_win = min(max(float(row["preference"]) - 1.0, 0.0), 1.0)
            except (TypeError, ValueError):
                continue
            if weak_win != weak_win:  # NaN preference: the judge abstained
                continue
            record = by_prompt.setdefault(row["instruction"], Record(prompt=row["instruction"], source="alpaca-eval"))
            record.scores[model] = weak_win
            if model == "Mixtral-8x7B-Instruct-v0.1":
                record.strong_quality, record.weak_quality = 1.0 - weak_win, weak_win
    return list(by_prompt.values())


def _strip_shots(raw: str) -> str:
    try:
        parts = ast.literal_eval(raw)
        text = parts[-1] if isinstance(parts, list) else str(parts)
    except (ValueError, SyntaxError):
        text = raw
    return text.strip().split("\n\n")[-1].strip()


def load_routerbench(root: Path, source: str) -> list[Record]:
    csv.field_size_limit(1 << 30)
    records = []
    for split in ("train", "test"):
        path = root / "RouterDC" / "datasets" / "routerbench_zs" / f"{_ROUTERBENCH[source]}_{split}.csv"
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            models = [c for c in (reader.fieldnames or []) if "/" in c or c.startswith(("gpt", "claude"))]
            models = [m for m in models if "|" not in m]
            for row in reader:
                s = {m.split("/")[-1]: float(row[m]) for m in models if row[m] not in ("", None)}
                records.append(
                    Record(
                        prompt=_strip_shots(row["prompt"]),
                        source=source,
                        id=row["sample_id"],
                        scores=s,
                        strong_quality=s.get(STRONG_MODEL),
                        weak_quality=s.get("mixtral-8x7b-chat"),
                    )
                )
    return records


def load_source(source: str, root: str | Path | None = None) -> list[Record]:
    """Records of one routing-data source (one of SOURCES)."""
    base = find_routing_data(root)
    if source == "arena-hard":
        return load_arena_hard(base)
    if source == "alpaca-eval":
        return load_alpaca_eval(base)
    if source in _ROUTERBENCH:
        return load_routerbench(base, source)
    raise TrainingDataError(f"unknown routing-data source {source!r}; expected one of {', '.join(SOURCES)}")
