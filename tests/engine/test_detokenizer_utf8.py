"""The incremental detokenizer never hands out part of a character (issue 21), checked against
the bundled model's real tokenizer: thousands of seeded token sequences drawn from CJK and emoji
tokens, the 128 byte-level tokens that each carry one byte of a multi-byte character (so
characters are split across tokens in every possible place, and invalid sequences occur too),
and ASCII. The deltas, joined, must equal the tokenizer's decode of the whole sequence (an
incomplete character at the very end aside, which generation stopping drops), so a U+FFFD in a
delta exists only where the bytes themselves are not UTF-8, as in the non-streamed text."""

from __future__ import annotations

import random

import pytest

from lmserve.engine.detokenizer import IncrementalDetokenizer

TEXT = ("😀🎉👍🏽👨‍👩‍👧 中文字符测试，漢字、ひらがな、한국어 🇯🇵 café ñ ü € ₿ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 "
        "用中文写一首关于月亮的短诗 🌙✨ 日本語で挨拶して")


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lmserve.models.loader import bundled_model_path

    p = bundled_model_path()
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def _streamed(tokenizer, ids: list[int], stop: list[str] | None = None) -> tuple[list[str], str | None]:
    d = IncrementalDetokenizer(tokenizer, stop)
    deltas, matched = [], None
    for t in ids:
        matched = d.add_token(t)
        deltas.append(d.take_delta(False))
        if matched:
            break
    if not matched:
        matched = d.flush()
    deltas.append(d.take_delta(True))
    return deltas, matched


def _without_incomplete_tail(text: str) -> str:
    return text.rstrip("\ufffd")


def test_deltas_join_to_the_whole_decode(tokenizer):
    vocab = tokenizer.get_vocab()
    byte_tokens = [vocab[c] for b, c in _byte_level_alphabet().items() if b >= 0x80 and c in vocab]
    assert len(byte_tokens) >= 100, "the bundled tokenizer is expected to be byte-level BPE"
    multi = sorted(set(tokenizer.encode(TEXT, add_special_tokens=False)))
    ascii_ = tokenizer.encode(" hi there, ok.", add_special_tokens=False)
    rng = random.Random(21)
    checked = split = 0
    for _ in range(2000):
        pool = rng.choice([multi + byte_tokens, multi + ascii_, byte_tokens + ascii_, multi + byte_tokens + ascii_])
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 40))]
        deltas, _ = _streamed(tokenizer, ids)
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        joined = "".join(deltas)
        # equal, except that a character cut off by the end of generation is dropped
        assert joined == whole or (whole.startswith(joined) and not _without_incomplete_tail(whole[len(joined):])), \
            (ids, deltas, whole)
        checked += 1
        split += any(len(tokenizer.decode([t]).encode()) and "\ufffd" in tokenizer.decode([t]) for t in ids)
    assert checked == 2000 and split > 1000  # most sequences do split characters across tokens


def test_real_text_streams_exactly(tokenizer):
    ids = tokenizer.encode(TEXT * 3, add_special_tokens=False)
    deltas, _ = _streamed(tokenizer, ids)
    assert "".join(deltas) == TEXT * 3 and not any("\ufffd" in d for d in deltas)


def test_a_stop_string_made_of_emoji_is_cut_whole(tokenizer):
    ids = tokenizer.encode("前文 🌙✨ 后文", add_special_tokens=False)
    deltas, matched = _streamed(tokenizer, ids, stop=["✨"])
    assert matched == "✨" and "".join(deltas) == "前文 🌙" and not any("\ufffd" in d for d in deltas)
