"""Prompt features: signed hashed word n-grams plus a few text statistics.

Feature hashing ("the hashing trick", Weinberger et al., ICML 2009) with CRC32 keeps the vocabulary out of
the artefact and makes a feature vector computable in tens of microseconds in pure Python + numpy.
The same vector layout is the input of the exported ONNX model, so an edge client that reimplements
:meth:`FeatureExtractor.transform_one` (CRC32, a regex, a few counts) scores exactly like the gateway.

Layout of one feature vector (length ``hash_dim + NUM_STATS``)::

    [0, hash_dim)                  signed hashed word uni/bi-grams of the first max_tokens tokens of the last
                                   user turn (lowercased, regex TOKEN_RE, first max_chars characters); each
                                   n-gram occurrence adds ±1/sqrt(num_ngrams) at (code & (hash_dim-1)), the
                                   sign being bit 31 of its 32-bit code (see ngram_codes)
    [hash_dim, hash_dim+NUM_STATS) raw text statistics, in the order of STAT_NAMES
    [hash_dim+NUM_STATS, ...+embedding_dim)
                                   only in the opt-in "accurate" mode (spec.embedding set): the unit-length
                                   all-MiniLM-L6-v2 sentence embedding of the last user turn's first
                                   embedding_tokens WordPiece tokens (gateway.routing.embedding)

``hash_dim`` may be 0 (no hashed block), which is how the accurate mode is trained by default.
"""

from __future__ import annotations

import math
import re
import threading
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
from scipy import sparse

from gateway.routing.errors import ArtefactError, EmptyPromptError, RouterError

TOKEN_RE = re.compile(r"\w+|[^\w\s]")
CHOICE_RE = re.compile(r"(?m)^\s*\(?[A-Ea-e][\).:]\s")

_DIGITS = b"0123456789"
_UPPER = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_SYMBOLS = b"=+-*/^<>(){}[]\\$%|_&#~"
_PUNCT = bytes(c for c in range(33, 127) if not chr(c).isalnum() and c != ord("_"))
_SPACE = b" \t\n\r\f\v"
_DIGIT_RUNS = bytes(c if chr(c).isdigit() else 32 for c in range(256))  # digits kept, all else -> space
_CODE_MARKERS = ("```", "def ", "return", ";\n", "{\n", "import ", "function", "#include", "SELECT ", "</")

STAT_NAMES: tuple[str, ...] = (
    "log_chars",
    "log_words",
    "log_lines",
    "log_code_fences",
    "digit_frac",
    "upper_frac",
    "symbol_frac",
    "log_question_marks",
    "non_ascii_frac",
    "mean_word_len",
    "log_choice_markers",
    "log_numbers",
    "log_code_markers",
    "log_turns",
    "log_context_chars",
)
NUM_STATS = len(STAT_NAMES)
# Sentence encoders the accurate mode knows how to load, with their output widths.
EMBEDDINGS: dict[str, int] = {"all-MiniLM-L6-v2": 384}


@dataclass(slots=True, frozen=True)
class FeatureSpec:
    """How prompts become vectors; saved in the router manifest so a loaded router featurises identically.

    Usage::

        spec = FeatureSpec(hash_dim=2**14)
        x = FeatureExtractor(spec).transform_one("What is 2+2?")
    """

    hash_dim: int = 2**15
    max_chars: int = 4096  # characters of the last user turn that are read (its full length is a statistic)
    max_tokens: int = 384  # of those, tokens that are hashed; together these bound the p99 latency
    ngram_max: int = 2
    version: int = 1
    embedding: str = ""  # "" or a sentence encoder's name (EMBEDDINGS): the opt-in "accurate" mode
    embedding_dim: int = 0  # its output width (384 for all-MiniLM-L6-v2); 0 without an embedding
    embedding_tokens: int = 128  # WordPiece tokens of the last user turn the encoder reads

    def __post_init__(self) -> None:
        if self.hash_dim != 0 and (self.hash_dim < 16 or self.hash_dim & (self.hash_dim - 1)):
            raise ValueError(f"hash_dim must be 0 or a power of two >= 16, got {self.hash_dim}")
        if bool(self.embedding) != (self.embedding_dim > 0):
            raise ValueError(
                f"embedding {self.embedding!r} and embedding_dim {self.embedding_dim} must be set together"
            )
        if self.embedding in EMBEDDINGS and EMBEDDINGS[self.embedding] != self.embedding_dim:
            raise ValueError(
                f"{self.embedding} embeddings have {EMBEDDINGS[self.embedding]} dimensions, not {self.embedding_dim}"
            )
        if not 2 <= self.embedding_tokens <= 512:
            raise ValueError(f"embedding_tokens must be in [2, 512], got {self.embedding_tokens}")
        if self.max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {self.max_chars}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.ngram_max not in (1, 2, 3):
            raise ValueError(f"ngram_max must be 1, 2 or 3, got {self.ngram_max}")
        if self.version != 1:
            raise ValueError(f"unknown feature spec version {self.version}")

    @classmethod
    def accurate(cls, *, hash_dim: int = 0, embedding_tokens: int = 128) -> FeatureSpec:
        """The opt-in accurate mode: text statistics + the all-MiniLM-L6-v2 sentence embedding."""
        name = "all-MiniLM-L6-v2"
        return cls(hash_dim=hash_dim, embedding=name, embedding_dim=EMBEDDINGS[name], embedding_tokens=embedding_tokens)

    @property
    def num_dense(self) -> int:
        """Columns after the hashed block: the statistics, then the embedding if any."""
        return NUM_STATS + self.embedding_dim

    @property
    def num_features(self) -> int:
        return self.hash_dim + self.num_dense

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.embedding:  # specs without an embedding keep the layout they were saved with before it
            for key in ("embedding", "embedding_dim", "embedding_tokens"):
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        return cls(**data)


def _content_text(content: Any) -> str:
    """OpenAI message content: a string or a list of parts (only text parts count)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type", "text") == "text"
        )
    raise RouterError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def split_conversation(x: str | Sequence[dict[str, Any]]) -> tuple[str, str, int]:
    """Return (last user turn, earlier context joined, number of earlier messages).

    A string is a single user turn. A list is OpenAI-style ``[{"role": ..., "content": ...}, ...]``; the last
    ``user`` message is what the router judges, everything before it is context.
    """
    if isinstance(x, str):
        query, context, num_turns = x, "", 0
    elif isinstance(x, Sequence) and not isinstance(x, (bytes, bytearray)):
        user_idx = -1
        for i, message in enumerate(x):
            if not isinstance(message, dict) or "role" not in message:
                raise RouterError(f"message {i} must be a dict with 'role' and 'content', got {message!r:.80}")
            if message["role"] == "user":
                user_idx = i
        if user_idx < 0:
            raise EmptyPromptError("conversation has no user message to route")
        query = _content_text(x[user_idx].get("content"))
        context = "\n".join(_content_text(m.get("content")) for m in x[:user_idx])
        num_turns = user_idx
    else:
        raise RouterError(f"expected a prompt string or a list of messages, got {type(x).__name__}")
    if not query.strip():
        raise EmptyPromptError("prompt is empty: nothing to route")
    return query, context, num_turns


_MIX1 = np.uint64(0x9E3779B97F4A7C15)
_MIX2 = np.uint64(0xC2B2AE3D27D4EB4F)
_CODE_CACHE: dict[str, int] = {}
_CODE_CACHE_MAX = 1 << 18


def _token_code(token: str) -> int:
    """CRC32 of the token's UTF-8 bytes, memoised (most traffic reuses a small vocabulary)."""
    code = _CODE_CACHE.get(token)
    if code is None:
        code = zlib.crc32(token.encode())
        if len(_CODE_CACHE) < _CODE_CACHE_MAX:
            _CODE_CACHE[token] = code
    return code


def ngram_codes(unigram_codes: np.ndarray, ngram_max: int) -> np.ndarray:
    """32-bit codes of all 1..ngram_max-grams. An n-gram's code extends the (n-1)-gram's:
    ``code(a..b) = ((code(a..b-1) * MIX1 + crc32(b)) * MIX2 mod 2**64) >> 32`` (uint64 wrap-around)."""
    parts = [unigram_codes]
    prev = unigram_codes
    with np.errstate(over="ignore"):
        for n in range(2, ngram_max + 1):
            prev = ((prev[:-1] * _MIX1 + unigram_codes[n - 1 :]) * _MIX2) >> np.uint64(32)
            parts.append(prev)
    return np.concatenate(parts)


class FeatureExtractor:
    """Turns prompts or conversations into feature vectors (see the module docstring for the layout)."""

    def __init__(self, spec: FeatureSpec | None = None, *, encoder: SentenceEncoderLike | None = None) -> None:
        self.spec = spec or FeatureSpec()
        self._mask = np.uint64(max(self.spec.hash_dim - 1, 0))
        if encoder is not None and encoder.dim != self.spec.embedding_dim:
            raise ArtefactError(f"encoder gives {encoder.dim}-d embeddings, the spec needs {self.spec.embedding_dim}")
        self._encoder = encoder

    @property
    def encoder(self) -> SentenceEncoderLike | None:
        """The sentence encoder of the accurate mode (loaded, and pulled if needed, on first use)."""
        if self._encoder is None and self.spec.embedding:
            self._encoder = shared_encoder(self.spec.embedding, self.spec.embedding_tokens)
        return self._encoder

    def hashed(self, tokens: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Indices (int64) and signed values (float64) of the hashed n-grams of lowercased ``tokens``."""
        tokens = tokens[: self.spec.max_tokens]
        if not tokens or self.spec.hash_dim == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        unigrams = np.fromiter(map(_token_code, tokens), np.uint64, len(tokens))
        codes = ngram_codes(unigrams, self.spec.ngram_max)
        indices = (codes & self._mask).astype(np.int64)
        # Bit 31 of the code picks the sign, so collisions cancel in expectation instead of adding up.
        values = np.where((codes >> np.uint64(31)) & np.uint64(1), -1.0, 1.0) / math.sqrt(len(codes))
        return indices, values

    def stats(self, query: str, text: str, tokens: list[str], context: str, num_turns: int) -> np.ndarray:
        """The NUM_STATS raw statistics, in STAT_NAMES order, of ``text`` (the query cut to max_chars)."""
        raw = text.encode("utf-8", "ignore")
        num_bytes = max(len(raw), 1)
        num_punct = len(raw) - len(raw.translate(None, _PUNCT))
        num_space = len(raw) - len(raw.translate(None, _SPACE))
        num_words = max(len(tokens) - num_punct, 1)  # punctuation tokens are single characters
        return np.array(
            [
                math.log1p(len(query)),
                math.log1p(len(tokens)),
                math.log1p(text.count("\n")),
                math.log1p(text.count("```")),
                (len(raw) - len(raw.translate(None, _DIGITS))) / num_bytes,
                (len(raw) - len(raw.translate(None, _UPPER))) / num_bytes,
                (len(raw) - len(raw.translate(None, _SYMBOLS))) / num_bytes,
                math.log1p(text.count("?")),
                (len(raw) - len(text)) / num_bytes,
                (len(text) - num_punct - num_space) / num_words,
                math.log1p(len(CHOICE_RE.findall(text))),
                math.log1p(len(raw.translate(_DIGIT_RUNS).split())),
                math.log1p(sum(text.count(m) for m in _CODE_MARKERS)),
                math.log1p(num_turns),
                math.log1p(len(context)),
            ],
            dtype=np.float64,
        )

    def _text_parts(self, x: str | Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
        query, context, num_turns = split_conversation(x)
        text = query[: self.spec.max_chars]
        tokens = TOKEN_RE.findall(text.lower())
        indices, values = self.hashed(tokens)
        return indices, values, self.stats(query, text, tokens, context, num_turns), text

    def parts(self, x: str | Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(hash indices, hash values, dense columns) of one prompt or conversation: the sparse form used to
        score. The dense columns are the statistics, then the embedding in the accurate mode."""
        indices, values, stats, text = self._text_parts(x)
        if self.spec.embedding:
            stats = np.concatenate([stats, self.encoder.encode_one(text).astype(np.float64)])
        return indices, values, stats

    def transform_one(self, x: str | Sequence[dict[str, Any]]) -> np.ndarray:
        """Dense float64 vector of length ``spec.num_features`` (the ONNX model's input row; cast for float32)."""
        indices, values, dense = self.parts(x)
        out = np.zeros(self.spec.num_features, np.float64)
        np.add.at(out, indices, values)
        out[self.spec.hash_dim :] = dense
        return out

    def transform(
        self,
        xs: Iterable[str | Sequence[dict[str, Any]]],
        *,
        on_embedded: Callable[[int], None] | None = None,
    ) -> sparse.csr_matrix:
        """CSR matrix [num_prompts, spec.num_features]; duplicate hash indices are summed. In the accurate mode
        the prompts are embedded in length-sorted batches after the text features; ``on_embedded(n)`` is
        called after each batch of n."""
        rows, cols, vals, texts = [], [], [], []
        num_rows = 0
        hash_dim = self.spec.hash_dim
        stat_cols = np.arange(hash_dim, hash_dim + NUM_STATS)
        for row, x in enumerate(xs):
            indices, values, stats, text = self._text_parts(x)
            rows.append(np.full(len(indices) + NUM_STATS, row))
            cols.append(np.concatenate([indices, stat_cols]))
            vals.append(np.concatenate([values, stats]))
            texts.append(text)
            num_rows = row + 1
        if num_rows == 0:
            return sparse.csr_matrix((0, self.spec.num_features))
        if self.spec.embedding:
            emb = self.encoder.encode(texts, on_batch=on_embedded).astype(np.float64)
            dim = self.spec.embedding_dim
            rows.append(np.repeat(np.arange(num_rows), dim))
            cols.append(np.tile(np.arange(hash_dim + NUM_STATS, hash_dim + NUM_STATS + dim), num_rows))
            vals.append(emb.ravel())
        matrix = sparse.coo_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(num_rows, self.spec.num_features),
        )
        return matrix.tocsr()


class SentenceEncoderLike(Protocol):
    """What the accurate mode needs from a sentence encoder (:class:`gateway.routing.embedding.SentenceEncoder`)."""

    dim: int

    def encode(self, texts: Sequence[str], *, on_batch: Callable[[int], None] | None = None) -> np.ndarray: ...

    def encode_one(self, text: str) -> np.ndarray: ...


_SHARED_ENCODERS: dict[tuple[str, int], SentenceEncoderLike] = {}
_SHARED_LOCK = threading.Lock()


def shared_encoder(name: str, max_tokens: int) -> SentenceEncoderLike:
    """One encoder per (model, token limit) per process, shared by every router that uses it."""
    if name not in EMBEDDINGS:
        raise ArtefactError(f"unknown sentence encoder {name!r} (known: {', '.join(EMBEDDINGS)})")
    with _SHARED_LOCK:
        key = (name, max_tokens)
        if key not in _SHARED_ENCODERS:
            from gateway.routing.embedding import SentenceEncoder

            _SHARED_ENCODERS[key] = SentenceEncoder.load(max_tokens=max_tokens)
        return _SHARED_ENCODERS[key]
