"""Training labels from the user's own data, in three formats, and how a label is constructed.

Formats (JSON lines; each line has ``"prompt": str`` or ``"messages": [...]``, optional ``"id"``, ``"source"``):

- ``pairwise``: ``"winner": "strong" | "weak" | "tie"`` (``"cloud"``/``"edge"`` also accepted), or
  ``"model_a"``, ``"model_b"``, ``"winner": "model_a" | "model_b" | "tie" | "tie (bothbad)"`` with
  ``--strong``/``--weak`` naming the pair. Label = P(strong answer wins), ties count half; repeated prompts
  are averaged.
- ``scores``: ``"scores": {"model": quality, ...}`` (higher is better, any scale per source), or
  ``"strong_score"``/``"weak_score"``.
- ``binary``: ``"label": 0 | 1`` (1 = the edge answer is not good enough).

Label construction for ``scores`` (``label="auto"`` picks ``difficulty`` when a record has >= 3 models):

- ``pair``: 1 if strong > weak, else 0 (a tie means the edge answer did not lose). Learns the judge's
  taste for one pair.
- ``difficulty``: absolute difficulty. Each model's score is min-max normalised over its source, the
  prompt's badness is the mean of (1 - normalised score) over the non-frontier models (all but the
  strong model and ``frontier``), and the label is that badness's percentile rank within the source.
  This carries across domains far better than any pair label.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gateway.routing.errors import TrainingDataError

Format = Literal["pairwise", "scores", "binary"]
LabelKind = Literal["auto", "pair", "difficulty"]
FORMATS: tuple[str, ...] = ("pairwise", "scores", "binary")

_STRONG_NAMES = {"strong", "cloud"}
_WEAK_NAMES = {"weak", "edge"}


@dataclass(slots=True)
class Record:
    """One prompt as read from a file, before a label is chosen."""

    prompt: str | list[dict[str, Any]]
    source: str
    id: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    strong_quality: float | None = None  # quality if routed to the strong model, for evaluation
    weak_quality: float | None = None
    label: float | None = None  # set directly by pairwise and binary formats
    outcome: float | None = None  # P(edge answer loses); derived from the qualities when not given


@dataclass(slots=True)
class Example:
    """A prompt with its training target in [0, 1] (higher = more in need of the cloud)."""

    prompt: str | list[dict[str, Any]]
    source: str
    label: float
    strong_quality: float | None = None
    weak_quality: float | None = None
    id: str | None = None
    outcome: float | None = None  # P(edge answer loses to the cloud answer), what the score is calibrated to


def prompt_key(prompt: str | list[dict[str, Any]]) -> str:
    """Normalised text used to merge repeated prompts and to deduplicate evaluation against training."""
    if isinstance(prompt, str):
        text = prompt
    else:
        text = "\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))
    return " ".join(text.lower().split())


def prompt_hash(prompt: str | list[dict[str, Any]]) -> int:
    """64-bit hash of :func:`prompt_key`; routers store these to deduplicate later evaluations."""
    return int.from_bytes(hashlib.blake2b(prompt_key(prompt).encode(), digest_size=8).digest(), "little")


def _prompt_of(row: dict[str, Any], path: Path, line: int) -> str | list[dict[str, Any]]:
    if "prompt" in row:
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            raise TrainingDataError("'prompt' must be a string", path=path, line=line)
        if not prompt.strip():
            raise TrainingDataError("'prompt' is empty", path=path, line=line)
        return prompt
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise TrainingDataError("'messages' must be a list of {role, content} objects", path=path, line=line)
        if not any(m["role"] == "user" and str(m.get("content") or "").strip() for m in messages):
            raise TrainingDataError("'messages' has no non-empty user turn", path=path, line=line)
        return messages
    raise TrainingDataError("each line needs a 'prompt' or a 'messages' field", path=path, line=line)


def _number(value: Any, name: str, path: Path, line: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise TrainingDataError(f"'{name}' must be a finite number, got {value!r}", path=path, line=line)
    return float(value)


def _pairwise_label(row: dict[str, Any], strong: str | None, weak: str | None, path: Path, line: int) -> float:
    winner = row.get("winner")
    if not isinstance(winner, str):
        raise TrainingDataError("pairwise lines need a string 'winner'", path=path, line=line)
    if winner.startswith("tie"):
        return 0.5
    if "model_a" in row and winner in ("model_a", "model_b"):
        if strong is None or weak is None:
            raise TrainingDataError("model_a/model_b preferences need --strong and --weak", path=path, line=line)
        name = row[winner]
        other = row["model_b" if winner == "model_a" else "model_a"]
        if {name, other} != {strong, weak}:
            raise TrainingDataError(f"battle {name} vs {other} is not the pair {strong}/{weak}", path=path, line=line)
        return 1.0 if name == strong else 0.0
    if winner in _STRONG_NAMES or (strong is not None and winner == strong):
        return 1.0
    if winner in _WEAK_NAMES or (weak is not None and winner == weak):
        return 0.0
    raise TrainingDataError(f"unknown winner {winner!r} (use strong, weak or tie)", path=path, line=line)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON-lines file; problems name file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainingDataError(f"cannot read file: {exc}", path=path) from exc
    for line_no, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TrainingDataError(f"invalid JSON ({exc.msg} at column {exc.colno})", path=path, line=line_no) from exc
        if not isinstance(row, dict):
            raise TrainingDataError("each line must be a JSON object", path=path, line=line_no)
        yield line_no, row


def read_records(path: str | Path, fmt: Format, *, strong: str | None = None, weak: str | None = None) -> list[Record]:
    """Parse a JSON-lines training file; every problem names the file and line."""
    path = Path(path)
    if fmt not in FORMATS:
        raise TrainingDataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}", path=path)
    records: list[Record] = []
    for line_no, row in iter_jsonl(path):
        record = Record(
            prompt=_prompt_of(row, path, line_no),
            source=str(row.get("source", path.stem)),
            id=None if row.get("id") is None else str(row["id"]),
        )
        if fmt == "pairwise":
            record.label = record.outcome = _pairwise_label(row, strong, weak, path, line_no)
            record.strong_quality, record.weak_quality = record.label, 1.0 - record.label
        elif fmt == "binary":
            if row.get("label") not in (0, 1) or isinstance(row.get("label"), bool):
                raise TrainingDataError(f"'label' must be 0 or 1, got {row.get('label')!r}", path=path, line=line_no)
            record.label = record.outcome = float(row["label"])
            record.strong_quality, record.weak_quality = 1.0, 1.0 - record.label
        else:
            scores = row.get("scores")
            if scores is None and "strong_score" in row and "weak_score" in row:
                scores = {"strong": row["strong_score"], "weak": row["weak_score"]}
                strong_name, weak_name = "strong", "weak"
            else:
                strong_name, weak_name = strong, weak
            if not isinstance(scores, dict) or not scores:
                raise TrainingDataError(
                    "scores lines need 'scores': {model: number} or strong_score/weak_score", path=path, line=line_no
                )
            record.scores = {str(k): _number(v, f"scores.{k}", path, line_no) for k, v in scores.items()}
            if strong_name in record.scores and weak_name in record.scores:
                record.strong_quality = record.scores[strong_name]
                record.weak_quality = record.scores[weak_name]
        records.append(record)
    if not records:
        raise TrainingDataError("no records (file is empty)", path=path)
    return records


def _percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Mid-rank percentiles in (0, 1); ties share their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    for v in np.unique(values):  # average ranks of ties
        tied = values == v
        ranks[tied] = ranks[tied].mean()
    return (ranks + 0.5) / len(values)


def difficulty_labels(records: list[Record], *, exclude: set[str]) -> np.ndarray:
    """Percentile within source of the mean normalised badness over the non-excluded models."""
    labels = np.full(len(records), np.nan)
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_source[r.source].append(i)
    for source, idx in by_source.items():
        models = sorted({m for i in idx for m in records[i].scores} - exclude)
        if not models:
            raise TrainingDataError(f"source {source!r}: no non-frontier model scores to build a difficulty label")
        table = np.array([[records[i].scores.get(m, np.nan) for m in models] for i in idx])  # [prompts, models]
        lo, hi = np.nanmin(table, axis=0), np.nanmax(table, axis=0)
        goodness = (table - lo) / np.where(hi > lo, hi - lo, 1.0)
        badness = np.nanmean(1.0 - goodness, axis=1)
        ok = np.isfinite(badness)
        labels[np.array(idx)[ok]] = _percentile_ranks(badness[ok])
    return labels


def resolve_label_kind(records: list[Record], label: LabelKind) -> str:
    """What ``label="auto"`` means for these records: difficulty with >= 3 models per prompt, else pair."""
    scored = [r for r in records if r.label is None]
    if not scored:
        return "given"  # pairwise and binary files carry their labels
    if label != "auto":
        return label
    return "difficulty" if min(len(r.scores) for r in scored) >= 3 else "pair"


def _outcome(r: Record) -> float | None:
    if r.outcome is not None:
        return r.outcome
    if r.strong_quality is not None and r.weak_quality is not None:
        return float(r.strong_quality > r.weak_quality)
    return None


def build_examples(
    records: list[Record],
    *,
    label: LabelKind = "auto",
    strong: str | None = None,
    frontier: tuple[str, ...] = (),
) -> list[Example]:
    """Attach a training target to each record (see the module docstring) and merge repeated prompts."""
    scored = [r for r in records if r.label is None]
    if scored:
        kind = resolve_label_kind(records, label)
        if kind == "difficulty":
            targets = difficulty_labels(scored, exclude=set(frontier) | ({strong} if strong else set()))
        else:
            targets = np.full(len(scored), np.nan)
            for i, r in enumerate(scored):
                if r.strong_quality is not None and r.weak_quality is not None:
                    targets[i] = float(r.strong_quality > r.weak_quality)
            if np.isnan(targets).all():
                raise TrainingDataError("pair labels need --strong and --weak models present in 'scores'")
        for r, t in zip(scored, targets, strict=True):
            r.label = None if np.isnan(t) else float(t)
    merged: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for r in records:
        if r.label is not None:
            merged[(r.source, prompt_key(r.prompt))].append(r)
    examples = []
    for group in merged.values():
        first = group[0]
        sq = [g.strong_quality for g in group if g.strong_quality is not None]
        wq = [g.weak_quality for g in group if g.weak_quality is not None]
        outcomes = [_outcome(g) for g in group]
        outcomes = [o for o in outcomes if o is not None]
        examples.append(
            Example(
                prompt=first.prompt,
                source=first.source,
                label=float(np.mean([g.label for g in group])),
                strong_quality=float(np.mean(sq)) if sq else None,
                weak_quality=float(np.mean(wq)) if wq else None,
                id=first.id,
                outcome=float(np.mean(outcomes)) if outcomes else None,
            )
        )
    if not examples:
        raise TrainingDataError("no usable examples after label construction")
    return examples
