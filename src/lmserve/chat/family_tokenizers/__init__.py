"""Tokenizers for checkpoints whose own tokenizer is Python code (ChatGLM3, GLM-4 in its original
layout, InternLM2.5, TeleChat2), built from their vocabulary files with the libraries made for
them (sentencepiece, tiktoken) and the family's chat format, without running checkpoint code.

Chosen by the `tokenizer_class` that tokenizer_config.json names (or, without one, by
config.json's model_type) when the checkpoint has no tokenizer.json: a checkpoint that ships
tokenizer.json (glm-4-9b-chat-hf) is a plain transformers tokenizer and does not come here.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmserve.chat.family_tokenizers import templates
from lmserve.chat.family_tokenizers.sentencepiece_tokenizer import SentencePieceChatTokenizer
from lmserve.chat.family_tokenizers.tiktoken_tokenizer import GLM4_ROLES, TiktokenChatTokenizer, is_ranks_file

_BY_CLASS = {
    "ChatGLMTokenizer": "chatglm", "ChatGLM4Tokenizer": "chatglm",
    "InternLM2Tokenizer": "internlm2", "InternLM2TokenizerFast": "internlm2",
    # TeleChat2's released tokenizer_config.json says Telechat2Tokenizer.
    "Telechat2Tokenizer": "telechat2", "TeleChat2Tokenizer": "telechat2", "TelechatTokenizer": "telechat2",
}
_BY_MODEL_TYPE = {"chatglm": "chatglm", "internlm2": "internlm2", "telechat": "telechat2"}

CHATGLM3_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                     "<|observation|>")
# InternLM2's sentencepiece vocabulary names its chat tokens [UNUSED_TOKEN_141..146].
INTERNLM2_NAMES = {"[UNUSED_TOKEN_141]": "<|plugin|>", "[UNUSED_TOKEN_142]": "<|interpreter|>",
                   "[UNUSED_TOKEN_143]": "<|action_end|>", "[UNUSED_TOKEN_144]": "<|action_start|>",
                   "[UNUSED_TOKEN_145]": "<|im_end|>", "[UNUSED_TOKEN_146]": "<|im_start|>"}
# Tokens a tool-call reader must see in the decoded reply (decoding drops special tokens).
INTERNLM2_ACTION_TOKENS = frozenset({"<|action_start|>", "<|action_end|>", "<|plugin|>", "<|interpreter|>"})
TELECHAT2_TOOL_TOKENS = frozenset({"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"})


def family_of(directory: Path) -> str | None:
    """The family whose built-in tokenizer serves this checkpoint directory, or None."""
    if (directory / "tokenizer.json").is_file() or not (directory / "tokenizer.model").is_file():
        return None
    cfg = _read_json(directory / "tokenizer_config.json")
    cls = cfg.get("tokenizer_class") or _auto_map_class(cfg)
    if cls:
        return _BY_CLASS.get(cls)
    return _BY_MODEL_TYPE.get(_read_json(directory / "config.json").get("model_type", ""))


def load_family_tokenizer(directory: Path):
    """The family tokenizer for a checkpoint directory, or None when it is not one of these."""
    family = family_of(directory)
    if family is None:
        return None
    vocab = str(directory / "tokenizer.model")
    listed = _listed_tokens(_read_json(directory / "tokenizer_config.json"))
    if family == "chatglm" and is_ranks_file(vocab):
        return TiktokenChatTokenizer(vocab, listed or None, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                     chat_template=templates.GLM4)
    if family == "chatglm":
        return _sentencepiece(vocab, listed, templates.CHATGLM3, appended=CHATGLM3_SPECIALS, roles=GLM4_ROLES,
                              hidden=frozenset({"sop", "eop"}), expansions={"[gMASK]sop": ["[gMASK]", "sop"]},
                              prefix=("[gMASK]", "sop"))
    if family == "internlm2":
        return _sentencepiece(vocab, listed, templates.INTERNLM2, renamed=INTERNLM2_NAMES,
                              visible=INTERNLM2_ACTION_TOKENS, prefix=("<bos>",))
    return _sentencepiece(vocab, listed, templates.TELECHAT2, visible=TELECHAT2_TOOL_TOKENS)


def _sentencepiece(vocab: str, listed: dict[int, str], template: str, appended: tuple[str, ...] = (),
                   renamed: dict[str, str] | None = None, roles: tuple[str, ...] = (),
                   visible: frozenset[str] = frozenset(), hidden: frozenset[str] = frozenset(),
                   expansions: dict[str, list[str]] | None = None, prefix: tuple[str, ...] = ()):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.Load(vocab)
    size = sp.get_piece_size()
    controls = {size + i: t for i, t in enumerate(appended)}
    for piece, name in (renamed or {}).items():
        i = sp.piece_to_id(piece)
        if sp.id_to_piece(i) == piece:
            controls[i] = name
    controls.update(listed)
    names = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id(), "pad_token": sp.pad_id()}
    specials = {k: controls.get(i, sp.id_to_piece(i)) for k, i in names.items() if 0 <= i < size}
    if "pad_token" not in specials and "unk_token" in specials:
        specials["pad_token"] = specials["unk_token"]
    prefix = tuple(specials.get("bos_token", "") if t == "<bos>" else t for t in prefix)
    return SentencePieceChatTokenizer(vocab, controls, role_tokens=roles, visible=visible, hidden=hidden,
                                      expansions=expansions, prefix_tokens=prefix, chat_template=template,
                                      **specials)


def _auto_map_class(cfg: dict) -> str | None:
    """The class an `auto_map` names for AutoTokenizer ("tokenization_chatglm.ChatGLM4Tokenizer"):
    the name only, its code is never loaded."""
    entry = (cfg.get("auto_map") or {}).get("AutoTokenizer") if isinstance(cfg.get("auto_map"), dict) else None
    if isinstance(entry, list | tuple):
        entry = next((e for e in entry if isinstance(e, str)), None)
    return entry.rsplit(".", 1)[-1] if isinstance(entry, str) else None


def _listed_tokens(cfg: dict) -> dict[int, str]:
    """tokenizer_config.json's added_tokens_decoder as id -> content."""
    out = {}
    for key, value in (cfg.get("added_tokens_decoder") or {}).items():
        content = value.get("content") if isinstance(value, dict) else value
        if isinstance(content, str) and str(key).isdigit():
            out[int(key)] = content
    return out


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


__all__ = ["family_of", "load_family_tokenizer"]
