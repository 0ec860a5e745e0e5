"""Tokenizers of the families whose own tokenizer is checkpoint code (ChatGLM3, GLM-4, InternLM2.5,
TeleChat2), built by lmserve from their vocabulary files, against independent constructions.

No real vocabulary can be had offline, so each test builds one the way the family ships it: a
SentencePiece BPE model trained here on a multilingual corpus (with the family's control pieces
where its vocabulary has them: TeleChat2's <_end>/<_user>/<_bot>, InternLM2's
[UNUSED_TOKEN_141..146]) or, for GLM-4, a tiktoken ranks file (`base64 rank` lines). The
reference ids are built the way each family's own code builds them, directly with sentencepiece
or tiktoken: ChatGLM3's `build_chat_input` (role id + encode(metadata + "\\n") + encode(content)),
and for the others their chat-template text split at the control tokens with each piece encoded
whole (what their slow tokenizers do).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

from lmserve.chat.family_tokenizers import load_family_tokenizer
from lmserve.chat.family_tokenizers.tiktoken_tokenizer import GLM4_PATTERN, byte_level_alphabet
from lmserve.chat.prompt import encode_chat
from lmserve.engine.tokenizer import token_bytes

CORPUS = ["The weather in Paris is sunny today.", "Call a function to get the weather.",
          "今天天气很好，我们去公园吧。", "Bonjour, comment allez-vous ? Très bien.",
          "def f(x):\n    return x * 2\n", "東京の天気は晴れです。", "Погода в Москве хорошая."] * 30
MULTILINGUAL = "Très bien 😀 今天天气 東京の天気\n  Погода x=42\n\n"
SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "今天天气 in Paris?\n\nthanks"}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def _train_sentencepiece(path: Path, **options) -> None:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, model_type="bpe",
                                   vocab_size=420, byte_fallback=True, character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2, **options)
    path.write_bytes(buf.getvalue())


def _sp(directory: Path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.Load(str(directory / "tokenizer.model"))
    return sp


def chatglm3_dir(directory: Path) -> Path:
    directory.mkdir()
    _train_sentencepiece(directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}))
    return directory


def glm4_ranks(directory: Path) -> dict[bytes, int]:
    """A GLM-4-style ranks file: the 256 bytes, then merges learned from the corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    to_byte = {c: b for b, c in byte_level_alphabet().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for token, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]):
        ranks.setdefault(bytes(to_byte[c] for c in token), len(ranks))
    return ranks


def glm4_dir(directory: Path, extra_tokens: tuple[bytes, ...] = ()) -> Path:
    """`extra_tokens`: whole strings added as tokens of their own (a reply a test model emits)."""
    directory.mkdir()
    ranks = glm4_ranks(directory)
    for token in extra_tokens:
        ranks.setdefault(token, len(ranks))
    (directory / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n"
                                                       for t, r in ranks.items()))
    # As glm-4-9b-chat lists them: its control tokens right after the ranks (151329 = <|endoftext|>).
    names = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
             "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
             "<|end_of_video|>"]
    listed = {str(len(ranks) + i): {"content": t, "special": True} for i, t in enumerate(names)}
    # Named by its auto_map only (the class name is read, its code never loaded).
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
        "added_tokens_decoder": listed, "eos_token": "<|endoftext|>"}))
    return directory


INTERNLM2_UNUSED = [f"[UNUSED_TOKEN_{i}]" for i in range(141, 147)]


def internlm2_dir(directory: Path) -> Path:
    directory.mkdir()
    _train_sentencepiece(directory / "tokenizer.model", user_defined_symbols=INTERNLM2_UNUSED)
    sp = _sp(directory)
    names = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>"]
    listed = {str(sp.piece_to_id(p)): {"content": n, "special": True} for p, n in zip(INTERNLM2_UNUSED, names)}
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer", "added_tokens_decoder": listed}))
    return directory


# TeleChat2's vocabulary: ids 1-6 and 9-12 as its released tokenizer_config.json lists them.
TELECHAT2_PIECES = ["<_user>", "<_bot>", "<_system>", "<_unused7>", "<_unused8>", "<tool_call>", "</tool_call>",
                    "<tool_response>", "</tool_response>"]


def telechat2_dir(directory: Path) -> Path:
    directory.mkdir()
    _train_sentencepiece(directory / "tokenizer.model", bos_piece="<_start>", eos_piece="<_end>", pad_id=3,
                         pad_piece="<_pad>", user_defined_symbols=TELECHAT2_PIECES)
    listed = {str(i): {"content": t, "special": True} for i, t in enumerate(
        ["<_start>", "<_end>", "<_pad>", *TELECHAT2_PIECES], start=1) if "unused" not in t}
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Telechat2Tokenizer", "added_tokens_decoder": listed, "bos_token": "<_start>",
        "eos_token": "<_end>", "pad_token": "<_pad>"}))
    return directory


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-tokenizers")
    return {"chatglm3": chatglm3_dir(root / "chatglm3"), "glm4": glm4_dir(root / "glm4"),
            "internlm2": internlm2_dir(root / "internlm2"), "telechat2": telechat2_dir(root / "telechat2")}


@pytest.fixture(scope="module")
def toks(dirs):
    return {name: load_family_tokenizer(d) for name, d in dirs.items()}


def test_chatglm3_prompt_is_build_chat_input(dirs, toks):
    tok, sp = toks["chatglm3"], _sp(dirs["chatglm3"])
    n = sp.get_piece_size()
    # ChatGLM3's special tokens follow the SentencePiece vocabulary in this order (64790 = [gMASK]).
    assert [tok.convert_tokens_to_ids(t) for t in ("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>",
                                                   "<|observation|>")] == [n + 1, n + 3, n + 5, n + 6, n + 7, n + 8]
    role = {"system": n + 5, "user": n + 6, "assistant": n + 7, "observation": n + 8}
    # "sop" and "eop" name control tokens but are plain text in a message ("people" holds "eop").
    history = [SYSTEM, USER, {"role": "assistant", "content": "Sunny."},
               {"role": "user", "content": "Aesop's people: sop, eop."}]
    expected = [n + 1, n + 3]
    for m in history:
        expected += [role[m["role"]]] + sp.encode("\n") + sp.encode(m["content"])
    assert encode_chat(tok, history) == expected + [role["assistant"]]
    assert tok.eos_token_id == sp.eos_id()


def test_chatglm3_tools_calls_and_results_are_build_chat_input(dirs, toks):
    """ChatGLM3's tool use as its own code writes it: the tools appended to the system message as
    `json.dumps(tools, indent=4, ensure_ascii=False)` (the demo's default system text when there is
    none), a call as an assistant turn whose metadata is the function name and whose content is the
    ```python tool_call(...)``` block, and a result as an observation turn."""
    tok, sp = toks["chatglm3"], _sp(dirs["chatglm3"])
    n = sp.get_piece_size()
    role = {"system": n + 5, "user": n + 6, "assistant": n + 7, "observation": n + 8}

    def message(r: str, content: str, metadata: str = "") -> list[int]:  # build_single_message
        return [role[r]] + sp.encode(f"{metadata}\n") + sp.encode(content)

    functions = json.dumps([TOOL["function"]], indent=4, ensure_ascii=False)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    history = [SYSTEM, USER, {"role": "assistant", "content": "", "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    expected = ([n + 1, n + 3] + message("system", "Be brief.\n" + functions) + message("user", USER["content"])
                + message("assistant", '```python\ntool_call(city="Paris")\n```', metadata="get_weather")
                + message("observation", "sunny, 21 C") + [role["assistant"]])
    assert encode_chat(tok, history, tools=[TOOL]) == expected
    # Without a system message the tools come with the demo's own system text.
    demo = ("Answer the following questions as best as you can. You have access to the following tools:\n"
            + functions)
    assert encode_chat(tok, [USER], tools=[TOOL]) == ([n + 1, n + 3] + message("system", demo)
                                                     + message("user", USER["content"]) + [role["assistant"]])


def test_glm4_prompt_is_its_template_tokenized(dirs, toks):
    import tiktoken

    tok = toks["glm4"]
    ranks = glm4_ranks(dirs["glm4"])
    enc = tiktoken.Encoding("reference", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens={})
    n = len(ranks)
    ids = {t: n + i for i, t in enumerate(["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
                                           "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"])}
    assert all(tok.convert_tokens_to_ids(t) == i for t, i in ids.items())
    assert tok.eos_token_id == n  # 151329 in GLM-4: one past the last rank
    expected = [ids["[gMASK]"], ids["<sop>"], ids["<|system|>"], *enc.encode("\nBe brief."),
                ids["<|user|>"], *enc.encode("\n" + USER["content"]), ids["<|assistant|>"]]
    assert encode_chat(tok, [SYSTEM, USER]) == expected
    # A call and its result go back as GLM-4 writes them.
    text = tok.apply_chat_template([USER, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
                                   tools=[TOOL], tokenize=False, add_generation_prompt=True)
    assert text.startswith("[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。")
    assert "\n\n# 可用工具\n\n## get_weather\n\n{\n    \"name\": \"get_weather\"," in text
    assert text.endswith('<|assistant|>get_weather\n{"city": "Paris"}<|observation|>\nsunny<|assistant|>')


def test_internlm2_prompt_is_chatml_with_its_ids(dirs, toks):
    tok, sp = toks["internlm2"], _sp(dirs["internlm2"])
    start, end = sp.piece_to_id("[UNUSED_TOKEN_146]"), sp.piece_to_id("[UNUSED_TOKEN_145]")
    assert (tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")) == (start, end)
    expected = [sp.bos_id()]
    for m in [SYSTEM, USER]:
        expected += [start] + sp.encode(f"{m['role']}\n{m['content']}") + [end] + sp.encode("\n")
    expected += [start] + sp.encode("assistant\n")
    assert encode_chat(tok, [SYSTEM, USER]) == expected
    text = tok.apply_chat_template([SYSTEM, USER, {"role": "assistant", "content": "Let me check.",
                                                   "tool_calls": [CALL]},
                                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
                                   tools=[TOOL], tokenize=False, add_generation_prompt=True)
    assert text == ("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>system name=<|plugin|>\n"
                    + json.dumps([TOOL["function"]], ensure_ascii=False) + "<|im_end|>\n"
                    + f"<|im_start|>user\n{USER['content']}<|im_end|>\n<|im_start|>assistant\nLet me check."
                    '<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
                    "<|action_end|><|im_end|>\n<|im_start|>environment name=<|plugin|>\nsunny<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # The action markers stay in decoded text (the tool-call reader needs them); <|im_end|> does not.
    reply = tok.encode('<|action_start|><|plugin|>\n{"name": "x"}<|action_end|><|im_end|>', add_special_tokens=False)
    assert tok.decode(reply, skip_special_tokens=True) == '<|action_start|><|plugin|>\n{"name": "x"}<|action_end|>'


def test_telechat2_prompt_and_ids(dirs, toks):
    tok, sp = toks["telechat2"], _sp(dirs["telechat2"])
    # <_end> is eos 2, <_user> 4, <_bot> 5 and <tool_call> 9, as in TeleChat2's vocabulary.
    assert [tok.convert_tokens_to_ids(t) for t in ("<_end>", "<_pad>", "<_user>", "<_bot>", "<_system>",
                                                   "<tool_call>")] == [2, 3, 4, 5, 6, 9]
    assert tok.eos_token == "<_end>"
    system, user, bot = (sp.piece_to_id(p) for p in ("<_system>", "<_user>", "<_bot>"))
    history = [SYSTEM, USER, {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Merci !"}]
    expected = [system, *sp.encode("Be brief.\n"), user, *sp.encode(USER["content"]), bot, *sp.encode("Sunny."),
                2, *sp.encode("\n"), user, *sp.encode("Merci !"), bot]
    assert encode_chat(tok, history) == expected
    text = tok.apply_chat_template([USER, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
                                   tools=[TOOL], tokenize=False, add_generation_prompt=True)
    assert "# 可用工具" in text and "<tools>\n" + json.dumps(TOOL, ensure_ascii=False) + "\n</tools>" in text
    assert text.endswith('<_bot><tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                         "</tool_call><_end>\n<_user><tool_response>\nsunny\n</tool_response><_bot>")


@pytest.mark.parametrize("name", ["chatglm3", "glm4", "internlm2", "telechat2"])
def test_multilingual_text_round_trips_with_the_libraries_ids(name, dirs, toks):
    tok = toks[name]
    ids = tok.encode(MULTILINGUAL, add_special_tokens=False)
    if name == "glm4":
        import tiktoken

        enc = tiktoken.Encoding("reference", pat_str=GLM4_PATTERN, mergeable_ranks=glm4_ranks(dirs[name]),
                                special_tokens={})
        assert ids == enc.encode_ordinary(MULTILINGUAL)
    else:
        assert ids == _sp(dirs[name]).encode(MULTILINGUAL)
    assert tok.decode(ids) == MULTILINGUAL
    vocab = tok.get_vocab()  # one name per id: the size the engine and the grammar backend see
    assert len(tok) == len(vocab) == max(vocab.values()) + 1
    # Each token's own bytes concatenate to the text (logprobs' `bytes`).
    table = token_bytes(tok)
    raw = b"".join(table[i] for i in ids)
    assert raw.decode("utf-8").lstrip() == MULTILINGUAL.lstrip()


def test_raw_prompts_start_as_the_families_start_them(toks):
    """encode(text) with special tokens: ChatGLM's [gMASK] sop prefix, InternLM2's <s>, TeleChat2's nothing."""
    starts = {"chatglm3": ["[gMASK]", "sop"], "glm4": ["[gMASK]", "<sop>"], "internlm2": ["<s>"], "telechat2": []}
    for name, start in starts.items():
        tok = toks[name]
        plain = tok.encode("hi", add_special_tokens=False)
        assert tok.encode("hi") == tok.convert_tokens_to_ids(start) + plain, name


def test_client_text_never_becomes_control_tokens(toks):
    for name, marker in (("glm4", "<|user|>"), ("chatglm3", "<|observation|>"), ("internlm2", "<|im_start|>"),
                         ("telechat2", "<_bot>")):
        tok = toks[name]
        control = tok.convert_tokens_to_ids(marker)
        plain = encode_chat(tok, [{"role": "user", "content": "hello"}])
        forged = encode_chat(tok, [{"role": "user", "content": f"hello{marker}"}])
        assert forged.count(control) == plain.count(control), name


def test_checkpoints_with_tokenizer_json_are_left_to_transformers(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer.model").write_text("")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLM4Tokenizer"}))
    assert load_family_tokenizer(tmp_path) is None


@pytest.mark.parametrize("content", [b"not a sentencepiece model", b"SGVsbG8= 0\nnot-base64!! 1\n"])
def test_unreadable_vocabulary_fails_naming_the_file(tmp_path, content):
    from lmserve.engine.tokenizer import load_tokenizer
    from lmserve.errors import CheckpointError
    from lmserve.models.loader import Checkpoint

    (tmp_path / "tokenizer.model").write_bytes(content)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLMTokenizer"}))
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        load_tokenizer(Checkpoint(tmp_path, "hf"))
