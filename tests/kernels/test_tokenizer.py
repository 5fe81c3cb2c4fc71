"""Tokenizer tests: golden against transformers on the real SmolLM2 GGUF, tiny trained vocabularies
through both loaders (tokenizer.json and GGUF metadata), chat templates, streaming and errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from kernels import tokenizer as tokenizer_module
from kernels.errors import TokenizerError
from kernels.tokenizer import StreamDecoder, Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world, this is a test of the tokenizer. I'm sure they'll say it's fine.",
    "def foo(x):\n    return x * 2  # double\n\n\tif x > 10:\n\t\tpass\n",
    "Numbers 12345 and 3.14159 and 1,000,000 in 2024!",
    "Café déjà vu — naïve façade. 日本語のテキスト 你好，世界！ 😀👍🏽",
    "The quick brown fox jumps over the lazy dog.   Multiple   spaces\n\n\nand newlines.",
] * 20

# Varied text: English, unicode (accents, CJK, emoji, combining marks, RTL), code, whitespace,
# digits, punctuation, special tokens in the text, and the empty string.
TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "Café déjà vu — naïve façade, Ångström, Straße, İstanbul",
    "日本語のテキストとカタカナ ー 你好，世界！ 한국어 텍스트입니다",
    "Emoji: 😀👍🏽🇺🇸 and ❤️ and 👨‍👩‍👧‍👦",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u093f",
    "RTL: مرحبا بالعالم and שלום עולם",
    "def foo(x):\n    if x > 1:\n        return x ** 2  # square\n    return None\n",
    "\tif (a) {\n\t\tb = c;\n\t}\n",
    "   leading and trailing   ",
    "a  b   c    d\n\n\ne\r\n\r\nf \n \n g",
    "\n",
    " ",
    "Numbers 12345 and 3.14159 and 1,000,000 and 98765432109876543210",
    "Version v2.0.1-rc3 at 0x1F, $100.50, 50% off, 2024-01-31T12:00:00Z",
    "Punctuation!!! ??? ... --- (((parens))) [[brackets]] {{braces}} <<<>>> ;;; :::",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text <|im_end|>",
    "zero\u200bwidth and\u00a0nbsp",
    "",
]


def train_byte_level(pre: str, vocab_size: int = 600) -> tokenizers.Tokenizer:
    """A tiny byte-level BPE with the pre-tokenizer the model family's own tokenizer.json uses."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    split_then_bytes = lambda regex: pre_tokenizers.Sequence([  # noqa: E731
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    pipelines = {
        "gpt-2": byte_level,
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama-bpe": split_then_bytes(tokenizer_module._LLAMA3),
        "qwen2": split_then_bytes(tokenizer_module._QWEN2),
    }
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    tok.pre_tokenizer = pipelines[pre]
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def gguf_fields_of(tok: tokenizers.Tokenizer, pre: str, **extra) -> dict:
    """Export a trained tokenizer the way llama.cpp's converter writes it."""
    merges = json.loads(tok.to_str())["model"]["merges"]
    tokens = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in SPECIALS else 1 for t in tokens],
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in merges],
        "tokenizer.ggml.bos_token_id": tokens.index("<|im_start|>"),
        "tokenizer.ggml.eos_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.ggml.add_bos_token": False,
        **extra,
    }


def write_gguf(path: Path, fields: dict) -> Path:
    """A tensor-free GGUF carrying only a stub llama config and the tokenizer metadata."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(fields["tokenizer.ggml.tokens"]))
    setters = {
        "tokenizer.ggml.model": writer.add_tokenizer_model, "tokenizer.ggml.pre": writer.add_tokenizer_pre,
        "tokenizer.ggml.tokens": writer.add_token_list, "tokenizer.ggml.token_type": writer.add_token_types,
        "tokenizer.ggml.scores": writer.add_token_scores, "tokenizer.ggml.merges": writer.add_token_merges,
        "tokenizer.ggml.bos_token_id": writer.add_bos_token_id, "tokenizer.ggml.eos_token_id": writer.add_eos_token_id,
        "tokenizer.ggml.unknown_token_id": writer.add_unk_token_id,
        "tokenizer.ggml.add_bos_token": writer.add_add_bos_token,
        "tokenizer.ggml.add_space_prefix": writer.add_add_space_prefix,
        "tokenizer.chat_template": writer.add_chat_template,
    }
    for key, value in fields.items():
        setters[key](value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_stream_matches(tok: Tokenizer, ids: list[int], prompt_ids: list[int] = ()) -> list[str]:
    stream = tok.stream_decoder(prompt_ids=prompt_ids)
    pieces = [stream.step(i) for i in ids]
    pieces.append(stream.flush())
    expected = tok.decode([*prompt_ids, *ids])[len(tok.decode(list(prompt_ids))):]
    assert "".join(pieces) == expected, f"stream {pieces!r} != decode {expected!r}"
    assert not any("\ufffd" in p for p in pieces), f"U+FFFD emitted: {pieces!r}"
    return pieces


# -- the real default model: SmolLM2-135M-Instruct ---------------------------------------------

# Where transformers' GGUF loader and the true SmolLM2 tokenizer disagree. SmolLM2's tokenizer.json
# pre-tokenizer is Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)], and llama.cpp
# runs the same splits for tokenizer.ggml.pre = "smollm" (regex \p{N}, then the GPT-2 regex).
# transformers (5.x) has no entry for "smollm" and drops the Digits step, so a space before a
# non-ASCII numeral merges with it. ASCII digits agree only because SmolLM2 has no multi-digit
# tokens and no "Ġ<digit>" merges.
SMOLLM2_KNOWN_DIFFERENCES = {
    " ½ cup": [216, 16738, 7118],  # true: " " | "½" | " cup";  transformers: "Ġ\xc2" | "\xbd" | " cup"
    "sum ٣٤٥ and ① ②": None,       # Arabic-Indic digits and circled numbers after a space
}


@pytest.fixture(scope="module")
def smol(smollm2_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf_file(smollm2_gguf)


@pytest.fixture(scope="module")
def smol_hf(smollm2_gguf: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def smol_reference(smol_hf) -> tokenizers.Tokenizer:
    """transformers' vocabulary and merges with SmolLM2's published tokenizer.json pre-tokenizer."""
    reference = tokenizers.Tokenizer.from_str(smol_hf.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    return reference


@pytest.mark.slow
def test_smollm2_metadata(smol: Tokenizer) -> None:
    assert smol.vocab_size == 49152
    assert (smol.bos_token_id, smol.pad_token_id, smol.unk_token_id) == (1, 2, 0)
    assert smol.eos_token_ids == (2,) and smol.id_to_token(2) == "<|im_end|>"
    assert smol.add_bos_token is False and smol.has_chat_template
    assert smol.token_to_id("<|im_start|>") == 1 and smol.id_to_token(19556) == "Hello"


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_smollm2_encode_matches_transformers(smol: Tokenizer, smol_hf, smol_reference, text: str) -> None:
    ids = smol.encode(text)
    assert ids == smol_hf.encode(text, add_special_tokens=False), f"differs from transformers on {text!r}"
    assert ids == smol_reference.encode(text).ids
    assert smol.encode(text, add_special_tokens=True) == smol_hf.encode(text)  # SmolLM2 adds no BOS
    assert smol.decode(ids, skip_special_tokens=False) == text
    assert smol.decode(ids) == smol_hf.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize("text", sorted(SMOLLM2_KNOWN_DIFFERENCES))
def test_smollm2_numerals_follow_the_true_tokenizer(smol: Tokenizer, smol_hf, smol_reference, text: str) -> None:
    ids = smol.encode(text)
    assert ids == smol_reference.encode(text).ids
    if SMOLLM2_KNOWN_DIFFERENCES[text] is not None:
        assert ids == SMOLLM2_KNOWN_DIFFERENCES[text]
    assert ids != smol_hf.encode(text, add_special_tokens=False), (
        "transformers now splits numerals like SmolLM2's tokenizer.json; move this text into TEXTS"
    )
    assert smol.decode(ids) == text


@pytest.mark.slow
def test_smollm2_golden_ids(smol: Tokenizer) -> None:
    # Individual digits, as llama.cpp tokenizes SmolLM2.
    assert smol.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    assert smol.encode("<|im_start|>user\n") == [1, 4093, 198]


CONVERSATION = [
    {"role": "system", "content": "You are terse. Answer in one word."},
    {"role": "user", "content": "What colour is the sky? 🌤"},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And grass?\n  Be  exact."},
]


@pytest.mark.slow
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:], CONVERSATION[1:2]],
                         ids=["system", "default-system", "one-turn"])
def test_smollm2_chat_template_matches_transformers(smol: Tokenizer, smol_hf, messages, add_generation_prompt) -> None:
    text = smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = smol_hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == expected
    expected_ids = smol_hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    assert smol.encode_chat(messages, add_generation_prompt=add_generation_prompt) == expected_ids["input_ids"]
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt
    if messages[0]["role"] != "system":
        assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@pytest.mark.slow
def test_smollm2_content_parts_are_joined(smol: Tokenizer) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]}]
    joined = [{"role": "user", "content": "line one\nline two"}]
    assert smol.apply_chat_template(parts) == smol.apply_chat_template(joined)


@pytest.mark.slow
def test_smollm2_stream_decoder_holds_partial_characters(smol: Tokenizer) -> None:
    text = "Hi 😀 wörld — 日本語 🇺🇸 e\u0301 👍🏽 done"
    ids = smol.encode(text)
    pieces = assert_stream_matches(smol, ids)
    assert "".join(pieces) == text
    assert "" in pieces[:-1], "expected at least one id that ends mid-character"
    prompt = smol.encode_chat([{"role": "user", "content": "Say hi"}])
    assert_stream_matches(smol, ids, prompt_ids=prompt)


@pytest.mark.slow
def test_smollm2_stream_decoder_random_unicode(smol: Tokenizer) -> None:
    rng = random.Random(0)
    alphabet = [*"abc xyz\n\t.,!?0123", *"éüßñçø—…“”", *"日本語你好한국", "😀", "👍🏽", "🇺🇸", "e\u0301", "ب", "ש"]
    for _ in range(30):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        assert "".join(assert_stream_matches(smol, smol.encode(text))) == text


@pytest.mark.slow
def test_smollm2_stream_decoder_flushes_invalid_bytes(smol: Tokenizer) -> None:
    lead_byte = smol.token_to_id("ð")  # 0xF0 opens a 4-byte character that never completes
    ids = [*smol.encode("ok "), lead_byte]
    stream = smol.stream_decoder()
    assert "".join(stream.step(i) for i in ids) == "ok "
    assert stream.flush() == "\ufffd" == smol.decode(ids)[-1]


@pytest.mark.slow
def test_smollm2_encode_batch(smol: Tokenizer) -> None:
    assert smol.encode_batch(TEXTS) == [smol.encode(t) for t in TEXTS]


# -- tiny byte-level BPE: tokenizer.json and GGUF metadata must agree ------------------------

TINY_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_tiny_byte_level_json_and_gguf_agree(tmp_path: Path, pre: str) -> None:
    trained = train_byte_level(pre)
    trained.save(str(tmp_path / "tokenizer.json"))
    add_bos = pre == "llama-bpe"
    config = {"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "add_bos_token": add_bos, "chat_template": TINY_TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    from_json = Tokenizer.from_tokenizer_json(tmp_path)
    fields = gguf_fields_of(trained, pre, **{"tokenizer.ggml.add_bos_token": add_bos,
                                            "tokenizer.chat_template": TINY_TEMPLATE})
    from_fields = Tokenizer.from_gguf_metadata(fields)
    from_file = Tokenizer.from_gguf_file(write_gguf(tmp_path / "tiny.gguf", fields))

    for text in [*TEXTS, *CORPUS[:5]]:
        expected = trained.encode(text).ids
        for tok in (from_json, from_fields, from_file):
            assert tok.encode(text) == expected, f"{pre}: {text!r}"
            assert tok.decode(expected, skip_special_tokens=False) == text
        assert from_json.encode(text, True) == from_fields.encode(text, True) == from_file.encode(text, True)
    assert from_json.encode("<|im_end|>") == [SPECIALS.index("<|im_end|>")]
    assert from_json.add_bos_token == from_fields.add_bos_token == add_bos
    assert from_json.eos_token_ids == from_fields.eos_token_ids == (0, 2)  # <|endoftext|>, then the turn end
    messages = [{"role": "user", "content": "Hello 123"}]
    assert from_json.encode_chat(messages) == from_fields.encode_chat(messages) == from_file.encode_chat(messages)


def test_tokenizer_json_side_files(tmp_path: Path) -> None:
    # Newer HF checkpoints: AddedToken dicts in the config, the template in chat_template.jinja,
    # extra stop ids in generation_config.json.
    train_byte_level("gpt-2", vocab_size=300).save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": {"content": "<|im_start|>", "special": True}, "eos_token": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}<|im_end|>{% endfor %}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 1]}))
    tok = Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (0, 1, 2)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[x<|im_end|>"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    assert Tokenizer.from_tokenizer_json(tmp_path, {"chat_template": named}).chat_template.source == "D"


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_tiny_byte_level_gguf_matches_transformers(tmp_path: Path, pre: str) -> None:
    transformers = pytest.importorskip("transformers")
    fields = gguf_fields_of(train_byte_level(pre), pre)
    path = write_gguf(tmp_path / "tiny.gguf", fields)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = Tokenizer.from_gguf_file(path)
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), f"{pre}: {text!r}"


def test_unknown_control_token_spelling_stays_whole() -> None:
    # DeepSeek-style control tokens use characters outside the byte alphabet; they must not grow the vocab.
    fields = gguf_fields_of(train_byte_level("gpt-2", vocab_size=300), "gpt-2")
    fields["tokenizer.ggml.tokens"] = [*fields["tokenizer.ggml.tokens"], "<｜end▁of▁sentence｜>", "<think>"]
    fields["tokenizer.ggml.token_type"] = [*fields["tokenizer.ggml.token_type"], 3, 4]
    tok = Tokenizer.from_gguf_metadata(fields)
    assert tok.vocab_size == len(fields["tokenizer.ggml.tokens"])
    ids = tok.encode("a<｜end▁of▁sentence｜><think>b")
    assert ids[1:3] == [tok.vocab_size - 2, tok.vocab_size - 1]
    assert tok.decode(ids) == "a<think>b"  # control tokens are skipped, user-defined ones kept


def test_llamacpp_regex_list_matches_hf_pipeline() -> None:
    # llama.cpp writes "smollm" as the regexes [\p{N}, GPT-2] applied one after the other; as isolated
    # Splits that is the same as SmolLM2's Digits + ByteLevel pipeline.
    tok = Tokenizer.from_gguf_metadata(gguf_fields_of(train_byte_level("smollm"), "smollm"))
    regexes = tokenizers.Tokenizer.from_str(tok._backend.to_str())
    regexes.pre_tokenizer = tokenizer_module._byte_level_pre_tokenizer((r"\p{N}", tokenizer_module._GPT2))
    for text in [*TEXTS, " ½ cup", "sum ٣٤٥ and ① ②"]:
        assert tok.encode(text) == regexes.encode(text).ids, repr(text)


def test_missing_pre_tokenizer_uses_llamacpp_default(caplog: pytest.LogCaptureFixture) -> None:
    fields = gguf_fields_of(train_byte_level("gpt-2", vocab_size=300), "gpt-2")
    del fields["tokenizer.ggml.pre"]
    tok = Tokenizer.from_gguf_metadata(fields)
    assert "no pre-tokenizer" in caplog.text
    for text in TEXTS:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_bos_default_follows_llamacpp() -> None:
    # A file without tokenizer.ggml.add_bos_token: llama.cpp adds BOS for the Llama-3 family, not for GPT-2.
    for pre, expected in (("llama-bpe", True), ("gpt-2", False)):
        fields = gguf_fields_of(train_byte_level(pre, vocab_size=300), pre)
        del fields["tokenizer.ggml.add_bos_token"]
        tok = Tokenizer.from_gguf_metadata(fields)
        assert tok.add_bos_token is expected
        assert (tok.encode("hi", add_special_tokens=True)[0] == tok.bos_token_id) is expected
        assert tok.encode("hi")[0] != tok.bos_token_id


def test_repeated_token_strings_keep_every_id() -> None:
    fields = gguf_fields_of(train_byte_level("gpt-2", vocab_size=300), "gpt-2")
    tokens = fields["tokenizer.ggml.tokens"]
    fields["tokenizer.ggml.tokens"] = [*tokens, "zz-last", tokens[100]]  # the last id repeats id 100
    fields["tokenizer.ggml.token_type"] = [*fields["tokenizer.ggml.token_type"], 1, 1]
    tok = Tokenizer.from_gguf_metadata(fields)
    assert tok.vocab_size == len(tokens) + 2
    assert tok.id_to_token(len(tokens)) == "zz-last" and tok.token_to_id(tokens[100]) == 100
    assert tok.decode([len(tokens) + 1]) == ""  # nameless, but still a valid id


# -- tiny SentencePiece-style vocabulary (model "llama") -------------------------------------

@pytest.fixture(scope="module")
def spm_fields() -> dict:
    """A Llama-2-shaped vocabulary: <unk> <s> </s>, 256 byte tokens, merged pieces, single characters."""
    trained = tokenizers.SentencePieceBPETokenizer()
    trained.train_from_iterator(CORPUS, vocab_size=260, show_progress=False)
    pieces = [t for t, _ in sorted(trained.get_vocab().items(), key=lambda item: item[1]) if t != "<unk>"]
    merged, singles = [p for p in pieces if len(p) > 1], [p for p in pieces if len(p) == 1]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *merged, *singles]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(merged))]
        + [-1e4 - i for i in range(len(singles))],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * (len(merged) + len(singles)),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": True,
    }


SPM_TEXTS = [*TEXTS, "<s>Hello</s> there", "naïve 🦀 café\n\nnew"]


def test_tiny_sentencepiece_matches_transformers(tmp_path: Path, spm_fields: dict) -> None:
    transformers = pytest.importorskip("transformers")
    path = write_gguf(tmp_path / "spm.gguf", spm_fields)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = Tokenizer.from_gguf_metadata(spm_fields)
    assert ours.add_bos_token and ours.bos_token_id == 1 and ours.eos_token_ids == (2,)
    for text in SPM_TEXTS:
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == hf.encode(text), f"{text!r}"
        assert ids[0] == 1 and ours.encode(text) == ids[1:]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    crab = ours.encode("🦀")  # not in the training text: spelled with byte tokens
    assert [ours.id_to_token(i) for i in crab] == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]
    assert ours.decode(crab) == "🦀"


def test_tiny_sentencepiece_stream_decoder(spm_fields: dict) -> None:
    tok = Tokenizer.from_gguf_metadata(spm_fields)
    for text in SPM_TEXTS:
        text = text.replace("<s>", "").replace("</s>", "")
        assert "".join(assert_stream_matches(tok, tok.encode(text))) == tok.decode(tok.encode(text))


# -- chat template behaviour ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    fields = gguf_fields_of(train_byte_level("gpt-2", vocab_size=300), "gpt-2")
    return Tokenizer.from_gguf_metadata(fields)


def test_missing_template_falls_back_to_chatml(tiny: Tokenizer) -> None:
    assert not tiny.has_chat_template
    text = tiny.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tiny.token_to_id("<|im_end|>") in tiny.eos_token_ids


def template_tokenizer(tiny: Tokenizer, source: str) -> Tokenizer:
    return Tokenizer(tiny._backend, bos_token_id=tiny.bos_token_id, eos_token_ids=tiny.eos_token_ids,
                     chat_template=source)


def test_template_helpers(tiny: Tokenizer) -> None:
    tok = template_tokenizer(tiny, "{{ bos_token }}{{ messages[0]['content'] | tojson }}{{ extra_flag }}"
                                   "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}x{% endfor %}"
                                   "{% generation %}g{% endgeneration %}")
    messages = [{"role": "user", "content": "<b>&\"ü"}, {"role": "user", "content": "y"}]
    assert tok.apply_chat_template(messages, extra_flag="!") == '<|im_start|>"<b>&\\"ü"!xg'


def test_template_raise_exception_is_a_tokenizer_error(tiny: Tokenizer) -> None:
    source = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
    tok = template_tokenizer(tiny, source)
    with pytest.raises(TokenizerError, match="system first"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% set x = [] %}{{ x.append(1) }}",
])
def test_template_runs_sandboxed(tiny: Tokenizer, source: str) -> None:
    with pytest.raises(TokenizerError):
        template_tokenizer(tiny, source).apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_syntax_error(tiny: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="does not compile"):
        template_tokenizer(tiny, "{% for m in messages %}")


@pytest.mark.parametrize(("messages", "match"), [
    ("hello", "must be a list"),
    ([], "empty"),
    (["hello"], r"messages\[0\] must be a dict"),
    ([{"content": "x"}], "non-empty string 'role'"),
    ([{"role": "user"}], "has no 'content'"),
    ([{"role": "user", "content": 5}], "string or a list of text parts"),
    ([{"role": "user", "content": None}], "content None"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "'image_url'"),
    ([{"role": "user", "content": [{"type": "text"}]}], "no string 'text'"),
    ([{"role": "user", "content": "x", "meta": object()}], "only JSON values"),
])
def test_malformed_messages(tiny: Tokenizer, messages, match: str) -> None:
    with pytest.raises(TokenizerError, match=match):
        tiny.apply_chat_template(messages)


def test_tool_call_message_without_content(tiny: Tokenizer) -> None:
    calls = [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]
    text = tiny.apply_chat_template([{"role": "assistant", "content": None, "tool_calls": calls}], False)
    assert text == "<|im_start|>assistant\n<|im_end|>\n"


# -- loading errors and argument checks -------------------------------------------------------

@pytest.mark.parametrize(("change", "match"), [
    (lambda f: f.clear(), "no tokenizer"),
    (lambda f: f.update({"tokenizer.ggml.model": "bert"}), "not supported"),
    (lambda f: f.update({"tokenizer.ggml.pre": "no-such-pre"}), "unknown GGUF pre-tokenizer"),
    (lambda f: f.pop("tokenizer.ggml.merges"), "no tokenizer.ggml.merges"),
    (lambda f: f.update({"tokenizer.ggml.token_type": [1]}), "token types"),
    (lambda f: f.update({"tokenizer.ggml.eos_token_id": 10**6}), "outside the vocabulary"),
    (lambda f: f.update({"tokenizer.ggml.merges": ["a b c"]}), "two tokens"),
    (lambda f: f.update({"tokenizer.ggml.merges": ["zz qq"]}), "do not fit together"),
])
def test_bad_gguf_metadata(change, match: str) -> None:
    fields = gguf_fields_of(train_byte_level("gpt-2", vocab_size=300), "gpt-2")
    change(fields)
    with pytest.raises(TokenizerError, match=match):
        Tokenizer.from_gguf_metadata(fields)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_tokenizer_json(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load"):
        Tokenizer.from_tokenizer_json(tmp_path)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(TokenizerError, match="cannot read GGUF"):
        Tokenizer.from_gguf_file(tmp_path / "junk.gguf")


def test_argument_checks(tiny: Tokenizer) -> None:
    with pytest.raises(TypeError):
        tiny.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        tiny.encode_batch("not a list")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tiny.decode([tiny.vocab_size])
    assert isinstance(tiny.stream_decoder(), StreamDecoder)


def test_exports_sorted() -> None:
    assert tokenizer_module.__all__ == sorted(tokenizer_module.__all__) == ["StreamDecoder", "Tokenizer"]
