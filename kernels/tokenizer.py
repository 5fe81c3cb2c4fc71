"""Tokenizer: text <-> token ids, chat prompts, and streaming detokenization.

One class over a Hugging Face `tokenizers.Tokenizer`, built from either source a checkpoint has:

- an HF `tokenizer.json` (+ `tokenizer_config.json`), loaded as is;
- a GGUF file's `tokenizer.ggml.*` metadata, rebuilt into the equivalent `tokenizers` pipeline:
  * model "gpt2": byte-level BPE (Sennrich et al. 2016, GPT-2's byte alphabet). The pre-tokenizer
    comes from `tokenizer.ggml.pre` as llama.cpp's `llama-vocab.cpp` chooses it: a list of regexes,
    each splitting the pieces the previous one left, then the byte mapping.
  * model "llama": SentencePiece-style BPE over `▁`-escaped text with byte fallback (`<0xNN>`
    tokens), merges ranked by the score of the merged piece, built as transformers builds it.
  Control (type 3) and user-defined (type 4) tokens become added tokens, matched whole in the text.

`StreamDecoder` turns ids into text one id at a time with the prefix-offset / read-offset method
of TGI and vLLM: a character split across byte-level tokens is held back until it is complete.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from kernels.chat_template import CHATML_TEMPLATE, ChatTemplate, normalize_messages
from kernels.errors import TokenizerError

if TYPE_CHECKING:
    from kernels.checkpoints import Checkpoint

__all__ = ["StreamDecoder", "Tokenizer"]

logger = logging.getLogger(__name__)

# llama.cpp token types (gguf.TokenType).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes, as written in the models' own tokenizer.json files.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's fallback for byte-level files that name no pre-tokenizer.
_LLAMACPP_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
_DIGITS = "digits"  # HF's Digits(individual_digits=True): what llama.cpp writes as the regex \p{N}



class _Pre(NamedTuple):
    """What llama.cpp does for one `tokenizer.ggml.pre`: splits applied in order before the byte
    mapping, whether a word found whole in the vocabulary skips the merges, and BOS when unspecified."""

    splits: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_PRE_TOKENIZERS: dict[str, _Pre] = {
    **dict.fromkeys(("gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "mpt", "olmo",
                     "jais"), _Pre((_GPT2,))),
    # SmolLM2's tokenizer.json is Sequence[Digits(individual_digits), ByteLevel(use_regex)].
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    _Pre((_DIGITS, _GPT2))),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
                    _Pre((_LLAMA3,), ignore_merges=True, add_bos=True)),
    **dict.fromkeys(("dbrx", "smaug-bpe", "chatglm-bpe", "glm4"), _Pre((_LLAMA3,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"), _Pre((_QWEN2,))),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _Pre((_GPT4O,))),
    "tekken": _Pre((_TEKKEN,), ignore_merges=True, add_bos=True),
    "default": _Pre(_LLAMACPP_DEFAULT),
}

# Tokens that end a turn in common templates; used only when rendering a probe conversation fails.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eom_id|>")


@functools.cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def _byte_level_pre_tokenizer(splits: Sequence[str]) -> pre_tokenizers.PreTokenizer:
    # The first two shapes are the ones HF tokenizer.json files spell out; the rest are llama.cpp's lists.
    if list(splits) == [_GPT2]:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if list(splits) == [_DIGITS, _GPT2]:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    steps = [pre_tokenizers.Digits(individual_digits=True) if split == _DIGITS
             else pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
    return pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _field(fields: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = fields.get(key, default)
    if hasattr(value, "contents") and callable(value.contents):  # a gguf.ReaderField
        value = value.contents()
    if hasattr(value, "tolist"):  # a numpy array or scalar
        value = value.tolist()
    return value


def _merge_pairs(merges: Iterable[Any]) -> list[tuple[str, str]]:
    pairs = []
    for rank, merge in enumerate(merges):
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(parts) != 2:
            raise TokenizerError(f"merge {rank} ({merge!r}) is not two tokens separated by one space")
        pairs.append((parts[0], parts[1]))
    return pairs


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float],
                        vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the pair whose joined piece scores highest; rank merges that way.

    Ties are broken as transformers' `generate_merges` breaks them, so both build the same model.
    """
    best = dict(zip(tokens, scores, strict=True))
    candidates = []
    for piece, score in best.items():
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        candidates.extend((left, right, score) for left, right in local)
    candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def _post_processor(add_bos: bool, add_eos: bool, bos: tuple[str, int] | None,
                    eos: tuple[str, int] | None) -> processors.PostProcessor:
    head = [bos[0]] if add_bos and bos else []
    tail = [eos[0]] if add_eos and eos else []
    specials = [token for token, keep in ((bos, add_bos), (eos, add_eos)) if keep and token]
    return processors.TemplateProcessing(
        single=[*head, "$A", *tail], pair=[*head, "$A", *tail, *head, "$B:1", *tail], special_tokens=specials
    )


def _bpe(**kwargs: Any) -> models.BPE:
    try:
        return models.BPE(**kwargs)
    except Exception as exc:  # the Rust side raises plain Exception, e.g. for a merge of unknown tokens
        raise TokenizerError(f"GGUF vocabulary and merges do not fit together: {exc}") from exc


def _backend_from_gguf(fields: Mapping[str, Any]) -> tuple[tokenizers.Tokenizer, bool]:
    """The `tokenizers` pipeline a GGUF describes, and whether llama.cpp adds BOS when the file does not say."""
    model_name = _field(fields, "tokenizer.ggml.model")
    tokens = _field(fields, "tokenizer.ggml.tokens")
    if model_name is None or tokens is None:
        raise TokenizerError("GGUF metadata has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    types = _field(fields, "tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerError(f"GGUF has {len(tokens)} tokens but {len(types)} token types")
    merges = _field(fields, "tokenizer.ggml.merges")
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "eot_token_id", "eom_token_id"):
        token_id = _field(fields, f"tokenizer.ggml.{key}")
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise TokenizerError(f"tokenizer.ggml.{key} = {token_id} is outside the vocabulary of {len(tokens)}")

    vocab: dict[str, int] = {}
    if model_name == "gpt2":
        if merges is None:
            raise TokenizerError("GGUF byte-level BPE tokenizer (model 'gpt2') has no tokenizer.ggml.merges")
        alphabet = _byte_alphabet()
        spelled = set(alphabet.values())
        for index, (token, kind) in enumerate(zip(tokens, types, strict=True)):
            if kind not in (_CONTROL, _USER_DEFINED) and not set(token) <= spelled:
                token = "".join(alphabet[b] for b in token.encode("utf-8"))
            vocab.setdefault(token, index)
        pre = _field(fields, "tokenizer.ggml.pre") or "default"
        if pre not in _PRE_TOKENIZERS:
            raise TokenizerError(f"unknown GGUF pre-tokenizer {pre!r}; known: {sorted(_PRE_TOKENIZERS)}")
        if pre == "default":
            logger.warning("GGUF names no pre-tokenizer; using llama.cpp's default splits, which may degrade output")
        splits, ignore_merges, add_bos = _PRE_TOKENIZERS[pre]
        backend = tokenizers.Tokenizer(_bpe(vocab=vocab, merges=_merge_pairs(merges), ignore_merges=ignore_merges))
        backend.pre_tokenizer = _byte_level_pre_tokenizer(splits)
        backend.decoder = decoders.ByteLevel()
    elif model_name == "llama":
        scores = _field(fields, "tokenizer.ggml.scores")
        if merges is None and (scores is None or len(scores) != len(tokens)):
            raise TokenizerError("GGUF SentencePiece tokenizer (model 'llama') needs tokenizer.ggml.scores or merges")
        for index, token in enumerate(tokens):
            vocab.setdefault(token, index)
        pairs = _merge_pairs(merges) if merges is not None else _merges_from_scores(tokens, scores, vocab)
        unk_id = _field(fields, "tokenizer.ggml.unknown_token_id")
        add_prefix = bool(_field(fields, "tokenizer.ggml.add_space_prefix", True))
        add_bos = True  # llama.cpp adds BOS for SentencePiece vocabularies unless the file says otherwise
        backend = tokenizers.Tokenizer(_bpe(
            vocab=vocab, merges=pairs, unk_token=tokens[unk_id] if unk_id is not None else None,
            fuse_unk=True, byte_fallback=True,
        ))
        # transformers' LlamaTokenizer (legacy=False): `▁` prefix on the text's first piece only.
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
        )
        strip = [decoders.Strip(content=" ", left=1, right=0)] if add_prefix else []
        backend.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
        )
    else:
        raise TokenizerError(f"GGUF tokenizer model {model_name!r} is not supported (supported: 'gpt2', 'llama')")
    if len(vocab) != len(tokens):
        logger.warning("GGUF vocabulary repeats %d token strings; the first id of each is kept",
                       len(tokens) - len(vocab))

    typed = list(zip(tokens, types, strict=True))
    control = [AddedToken(t, special=True, normalized=False) for t, k in typed if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in typed if k == _USER_DEFINED]
    backend.add_special_tokens(control)
    backend.add_tokens(user)
    assert backend.get_vocab_size(with_added_tokens=True) == len(vocab), "an added token got a new id"
    return backend, add_bos


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc


class Tokenizer:
    """Text to token ids and back, for one checkpoint.

    Example:
        tok = Tokenizer.from_gguf_file("SmolLM2-135M-Instruct.Q4_1.gguf")
        ids = tok.encode_chat([{"role": "user", "content": "Hi!"}])
        stream = tok.stream_decoder()
        text = "".join(stream.step(i) for i in generated_ids) + stream.flush()
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None = None,
                 eos_token_ids: Sequence[int] = (), pad_token_id: int | None = None,
                 unk_token_id: int | None = None, chat_template: str | None = None,
                 vocab_size: int | None = None) -> None:
        self._backend = backend
        # The number of ids (embedding rows). By default the largest id + 1: a vocabulary that repeats a
        # string has ids the backend cannot name, so GGUF passes its token count.
        largest = max(backend.get_vocab(with_added_tokens=True).values(), default=-1)
        self.vocab_size: int = vocab_size if vocab_size is not None else largest + 1
        for name, token_id in (("bos", bos_token_id), ("pad", pad_token_id), ("unk", unk_token_id),
                               *(("eos", i) for i in eos_token_ids)):
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise TokenizerError(f"{name} token id {token_id} is outside the vocabulary of {self.vocab_size}")
        self.bos_token_id = bos_token_id
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.has_chat_template = chat_template is not None
        self.chat_template = ChatTemplate(chat_template if chat_template is not None else CHATML_TEMPLATE)
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        first_ids = backend.encode("", add_special_tokens=True).ids[:1]
        self.add_bos_token = bos_token_id is not None and first_ids == [bos_token_id]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_token_ids))
        self.eos_token_ids = tuple(dict.fromkeys([*self.eos_token_ids, *self._end_of_turn_ids()]))

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def from_tokenizer_json(cls, path_or_dir: str | Path,
                            tokenizer_config: Mapping[str, Any] | None = None) -> Tokenizer:
        """Load an HF `tokenizer.json`; special tokens, BOS policy and chat template come from
        `tokenizer_config` or the `tokenizer_config.json` beside it (plus `chat_template.jinja`
        and `generation_config.json` when present)."""
        path = Path(path_or_dir)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"no tokenizer.json at {path}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception on a malformed file
            raise TokenizerError(f"cannot load {path}: {exc}") from exc
        folder = path.parent
        if tokenizer_config is None:
            config_path = folder / "tokenizer_config.json"
            tokenizer_config = _read_json(config_path) if config_path.is_file() else {}

        def token_id(key: str) -> int | None:
            text = _token_text(tokenizer_config.get(key))
            return backend.token_to_id(text) if text is not None else None

        bos, eos = token_id("bos_token"), token_id("eos_token")
        if "add_bos_token" in tokenizer_config or "add_eos_token" in tokenizer_config:
            # Explicit flags rebuild the post-processor, as transformers does.
            backend.post_processor = _post_processor(
                bool(tokenizer_config.get("add_bos_token")), bool(tokenizer_config.get("add_eos_token")),
                (backend.id_to_token(bos), bos) if bos is not None else None,
                (backend.id_to_token(eos), eos) if eos is not None else None,
            )
        eos_ids = [eos] if eos is not None else []
        generation_path = folder / "generation_config.json"
        if generation_path.is_file():
            extra = _read_json(generation_path).get("eos_token_id")
            eos_ids += extra if isinstance(extra, list) else [extra] if isinstance(extra, int) else []

        template = tokenizer_config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        for name in ("chat_template.jinja", "chat_template.json"):
            if template is None and (folder / name).is_file():
                template = ((folder / name).read_text(encoding="utf-8") if name.endswith(".jinja")
                            else _read_json(folder / name).get("chat_template"))
        return cls(backend, bos_token_id=bos, eos_token_ids=eos_ids, pad_token_id=token_id("pad_token"),
                   unk_token_id=token_id("unk_token"), chat_template=template)

    @classmethod
    def from_gguf_metadata(cls, fields: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF key/values (`tokenizer.ggml.*`, `tokenizer.chat_template`), as plain Python values."""
        backend, add_bos_by_default = _backend_from_gguf(fields)
        bos = _field(fields, "tokenizer.ggml.bos_token_id")
        eos = _field(fields, "tokenizer.ggml.eos_token_id")
        add_bos = bool(_field(fields, "tokenizer.ggml.add_bos_token", add_bos_by_default))
        add_eos = bool(_field(fields, "tokenizer.ggml.add_eos_token", False))
        text = backend.id_to_token
        if add_bos or add_eos:
            backend.post_processor = _post_processor(
                add_bos, add_eos,
                (text(bos), bos) if bos is not None else None, (text(eos), eos) if eos is not None else None,
            )
        eos_ids = [i for i in (eos, _field(fields, "tokenizer.ggml.eot_token_id"),
                               _field(fields, "tokenizer.ggml.eom_token_id")) if i is not None]
        return cls(backend, bos_token_id=bos, eos_token_ids=eos_ids,
                   pad_token_id=_field(fields, "tokenizer.ggml.padding_token_id"),
                   unk_token_id=_field(fields, "tokenizer.ggml.unknown_token_id"),
                   chat_template=_field(fields, "tokenizer.chat_template"),
                   vocab_size=len(_field(fields, "tokenizer.ggml.tokens")))

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> Tokenizer:
        """The tokenizer a loaded checkpoint carries: GGUF metadata, or the HF folder's tokenizer.json."""
        if checkpoint.format == "gguf":
            return cls.from_gguf_metadata(checkpoint.metadata)
        return cls.from_tokenizer_json(checkpoint.path)

    @classmethod
    def from_gguf_file(cls, path: str | Path) -> Tokenizer:
        """Read the tokenizer metadata of a GGUF file (tensors are not touched)."""
        from gguf import GGUFReader

        try:
            reader = GGUFReader(str(path))
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"cannot read GGUF file {path}: {exc}") from exc
        return cls.from_gguf_metadata({k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")})

    # -- encoding and decoding ------------------------------------------------------------------

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (`<|im_start|>`) become their ids;
        `add_special_tokens` adds BOS/EOS only where the checkpoint asks for them."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch() takes a list of str")
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise TokenizerError(f"token id {bad} is outside the vocabulary of {self.vocab_size}")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def stream_decoder(self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, prompt_ids=prompt_ids, skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """Render a conversation with the checkpoint's template (ChatML when it has none)."""
        special = {name: self.id_to_token(i) for name, i in (("bos_token", self.bos_token_id),
                   ("eos_token", self.eos_token_id), ("unk_token", self.unk_token_id), ("pad_token", self.pad_token_id))
                   if i is not None}
        return self.chat_template.render(normalize_messages(messages), add_generation_prompt=add_generation_prompt,
                                         special_tokens=special, **extra)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    **extra: Any) -> list[int]:
        # The template writes BOS itself where the model wants one, so none is added here (as in transformers).
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **extra))

    def _end_of_turn_ids(self) -> list[int]:
        """The special token a template writes right after an assistant reply: generation stops there too."""
        reply = "PROBE_REPLY_5f1c"
        probes = ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}],
                  [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                   {"role": "assistant", "content": reply}])
        for probe in probes:
            try:
                rendered = self.apply_chat_template(probe, add_generation_prompt=False)
            except TokenizerError:
                continue
            if reply in rendered:
                after = rendered[rendered.rindex(reply) + len(reply):]
                for token_id in self.encode(after):
                    if token_id in self._special_ids:
                        return [token_id]
                    if self.decode([token_id]).strip():
                        break
                return []
        source = self.chat_template.source
        return [i for t in _END_OF_TURN_TOKENS if t in source and (i := self.token_to_id(t)) in self._special_ids]


class StreamDecoder:
    """Incremental detokenization: feed ids one at a time, get back only text that is complete.

    Two offsets into the id list: text up to `read_offset` has been returned; decoding restarts at
    `prefix_offset` (a few ids earlier) so that merges and spacing at the boundary come out as they
    would in one full decode. Text ending in U+FFFD is an unfinished UTF-8 character: hold it back.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.token_ids: list[int] = list(prompt_ids)
        # Keep up to 5 prompt ids as context, as vLLM does, so the first reply token decodes in place.
        self.prefix_offset = max(len(self.token_ids) - 5, 0)
        self.read_offset = len(self.token_ids)

    def step(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is still partial)."""
        self.token_ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return whatever is held back (at the end of a stream, including any invalid bytes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = self._tokenizer.decode
        prefix_text = decode(self.token_ids[self.prefix_offset:self.read_offset], self._skip)
        new_text = decode(self.token_ids[self.prefix_offset:], self._skip)
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return new_text[len(prefix_text):]
