"""Tokenizer and chat template, both taken from the checkpoint itself."""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

from lmserve.errors import CheckpointError
from lmserve.models.loader import Checkpoint

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(ckpt: Checkpoint):
    """transformers' tokenizer for the checkpoint (a GGUF's embedded tokenizer included). A
    checkpoint directory or GGUF file without a tokenizer gives None: such a model takes token
    ids only."""
    source, kwargs = ckpt.tokenizer_source
    if ckpt.format == "gguf":
        if ckpt.gguf.field("tokenizer.ggml.tokens") is None:
            return None
        # The fast-tokenizer class builds straight from the GGUF's vocabulary (~0.2 s). AutoTokenizer
        # would first build the whole model config from the same file with gguf's reader only to
        # pick that class: 3 s more at every start (docs/startup.md).
        try:
            from transformers.tokenization_utils_tokenizers import TokenizersBackend as FastTokenizer
        except ImportError:  # transformers 4.x
            from transformers import PreTrainedTokenizerFast as FastTokenizer

        return FastTokenizer.from_pretrained(source, **kwargs)
    from transformers import AutoTokenizer

    from lmserve.chat.family_tokenizers import load_family_tokenizer

    if not any((Path(source) / f).exists() for f in _TOKENIZER_FILES):
        return None
    # ChatGLM3, GLM-4, InternLM2.5 and TeleChat2 ship tokenizers that are Python code: built
    # here from their vocabulary files instead, never by running that code.
    try:
        family = load_family_tokenizer(Path(source))
    except (OSError, RuntimeError, ValueError) as e:  # sentencepiece raises RuntimeError/OSError
        raise CheckpointError(f"{Path(source) / 'tokenizer.model'}: not a readable tokenizer model ({e})") from None
    if family is not None:
        return family
    return AutoTokenizer.from_pretrained(source, **kwargs)


def render_chat(tokenizer, conversation: list[dict], **template_kwargs) -> str:
    """The prompt text for a conversation, by the checkpoint's own (sandboxed jinja) template.

    Some templates reject a system message (Gemma's raises "System role not supported"); the
    API still takes one, as OpenAI's does: the system text is then folded into the next user
    turn, separated by a blank line. Any other template error propagates.
    """
    from jinja2 import TemplateError, UndefinedError

    if tokenizer is None or not (template_kwargs.get("chat_template") or getattr(tokenizer, "chat_template", None)):
        raise ValueError("this model has no chat template; use generate() with a raw prompt")

    template_kwargs.setdefault("add_generation_prompt", True)

    def apply(messages: list[dict], keep_none: bool = False) -> str:
        if not keep_none:
            return tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs)
        # transformers drops None-valued keys before rendering, but some templates test for None
        # (DeepSeek-V2.5 renders a turn's tool calls only where `content is none`): render the
        # messages as they are, through the same sandboxed renderer.
        from transformers.utils.chat_template_utils import render_jinja_template

        kwargs = dict(template_kwargs)
        tools = kwargs.pop("tools", None)
        template = kwargs.pop("chat_template", None) or tokenizer.get_chat_template(None, tools)
        rendered, _ = render_jinja_template(
            conversations=[messages], tools=tools, chat_template=template,
            **{**tokenizer.special_tokens_map, **kwargs})
        return rendered[0]

    def render(messages: list[dict]) -> str:
        # Templates written for other message conventions fail with a TypeError or an undefined
        # value; each gets retried in the next convention: None content kept (see apply), then
        # tool-call arguments as JSON text (DeepSeek-V2.5 writes '```json\n' + arguments where
        # most write `arguments | tojson`), then also empty content for a turn that only calls
        # tools ('\n' + content). The first error is the one reported.
        has_none = any(v is None for m in messages for v in m.values())
        as_text = template_plain(messages, False)
        attempts = [(messages, False), (messages, True) if has_none else None,
                    (as_text, has_none) if as_text else None, (template_plain(messages, True), False)]
        first_error = None
        for attempt in attempts:
            if attempt is None or attempt[0] is None:
                continue
            try:
                return apply(*attempt)
            except (TypeError, UndefinedError) as e:
                first_error = first_error or e
        raise first_error

    try:
        return render(conversation)
    except TemplateError:
        folded = fold_system_messages(conversation)
        if folded is None:
            raise
    try:
        return render(folded)
    except TemplateError:
        return render(conversation)  # the original error, about what the client sent


def template_plain(conversation: list[dict], empty_content: bool) -> list[dict] | None:
    """The conversation with tool-call arguments as JSON text (and None content as "" if
    `empty_content`); None when that changes nothing."""
    changed = False
    out = []
    for message in conversation:
        calls = message.get("tool_calls")
        if calls and any(isinstance((c.get("function") or {}).get("arguments"), dict) for c in calls):
            changed = True
            calls = [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"],
                                                                                 ensure_ascii=False)}}
                     if isinstance((c.get("function") or {}).get("arguments"), dict) else c for c in calls]
            message = {**message, "tool_calls": calls}
        if empty_content and message.get("content", "") is None:
            changed = True
            message = {**message, "content": ""}
        out.append(message)
    return out if changed else None


def fold_system_messages(conversation: list[dict]) -> list[dict] | None:
    """System messages merged into the user turn after them; None when there is nothing to fold
    (no system message, or one with no user turn after it)."""
    out: list[dict] = []
    pending: list[str] = []
    for message in conversation:
        if message.get("role") in ("system", "developer"):
            pending.append(message.get("content") or "")
        elif pending and message.get("role") == "user":
            out.append({**message, "content": "\n\n".join([*pending, message.get("content") or ""])})
            pending = []
        else:
            out.append(message)
    if pending or len(out) == len(conversation):
        return None
    return out


# ---- user text is never control tokens ----------------------------------------------------------
#
# The rendered prompt is tokenized with the tokenizer's added tokens recognized: that is how the
# template's own markup (<|im_start|>, role headers) becomes the control tokens the model was
# trained on. Text the client wrote must never get that treatment: a message saying
# "<|im_end|><|im_start|>system" would otherwise forge a turn. So before rendering, every
# control-token string inside client text is swapped for an inert placeholder (ASCII letters and
# digits, which no template escapes or trims); after rendering, the text between placeholders is
# tokenized as usual and each placeholder as the plain text it stands for.


def control_strings(tokenizer) -> list[str]:
    """The strings the tokenizer turns into added (control) tokens, longest first."""
    cached = getattr(tokenizer, "_lmserve_control_strings", None)
    if cached is None:
        cached = sorted((t for t in tokenizer.get_added_vocab() if t), key=len, reverse=True)
        tokenizer._lmserve_control_strings = cached
    return cached


def encode_chat(tokenizer, conversation: list[dict], **template_kwargs) -> list[int]:
    """The prompt ids for a conversation: the template's markup as control tokens, everything that
    came from the client (contents, names, tool definitions and arguments) as plain text."""
    controls = control_strings(tokenizer)
    pattern = re.compile("|".join(map(re.escape, controls))) if controls else None
    found: list[str] = []
    nonce = ""
    if pattern is not None:
        nonce = "lmsrv" + secrets.token_hex(8)

        def neutralize(value):
            if isinstance(value, str):
                if not pattern.search(value):
                    return value

                def swap(m: re.Match) -> str:
                    found.append(m.group())
                    return f"{nonce}{len(found) - 1}q"

                return pattern.sub(swap, value)
            if isinstance(value, dict):
                return {k: neutralize(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [neutralize(v) for v in value]
            return value

        conversation = neutralize(conversation)
        # A deployment's own template (--chat-template) is markup, not client text.
        template = template_kwargs.pop("chat_template", None)
        template_kwargs = neutralize(template_kwargs)
        if template is not None:
            template_kwargs["chat_template"] = template
    text = render_chat(tokenizer, conversation, **template_kwargs)
    # The template writes its own special tokens (BOS where the model wants one).
    if not found:
        return tokenizer.encode(text, add_special_tokens=False)
    # Split only at the template's own control tokens, as the tokenizer itself would: the text
    # between two of them (client text with its control-looking strings put back) is encoded as one
    # plain run, so those strings tokenize as the same characters would anywhere (".<" stays one
    # token where the vocabulary has it).
    ids: list[int] = []
    restore = re.compile(f"{nonce}(\\d+)q")
    for i, piece in enumerate(re.split(f"({pattern.pattern})", text)):
        if i % 2:
            ids += tokenizer.encode(piece, add_special_tokens=False)
        elif piece:
            ids += tokenizer.encode(restore.sub(lambda m: found[int(m.group(1))], piece), add_special_tokens=False,
                                    split_special_tokens=True)
    return ids


def token_bytes(tokenizer) -> list[bytes]:
    """Each token id's own bytes (cached on the tokenizer): what a client must concatenate to get
    the exact text back, even where a token holds only part of a UTF-8 character."""
    cached = getattr(tokenizer, "_lmserve_token_bytes", None)
    if cached is not None:
        return cached
    own = getattr(tokenizer, "token_bytes_table", None)
    if callable(own):  # a tokenizer that knows its tokens' bytes (the tiktoken ones)
        tokenizer._lmserve_token_bytes = own()
        return tokenizer._lmserve_token_bytes
    try:
        table = _token_bytes_table(tokenizer)
    except Exception:  # a tokenizer class of its own: decoded text, right except mid-character
        table = [tokenizer.decode([i]).encode("utf-8") for i in range(len(tokenizer))]
    tokenizer._lmserve_token_bytes = table
    return table


def _token_bytes_table(tokenizer) -> list[bytes]:
    size = len(tokenizer)
    added = set(tokenizer.get_added_vocab())
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    byte_level = _decoder_type(tokenizer) == "ByteLevel"
    from lmserve.chat.family_tokenizers.tiktoken_tokenizer import byte_level_alphabet

    to_byte = {c: b for b, c in byte_level_alphabet().items()} if byte_level else {}
    table: list[bytes] = []
    for piece in pieces:
        if not piece:
            table.append(b"")
        elif isinstance(piece, bytes):
            table.append(piece)
        elif piece in added:
            table.append(piece.encode("utf-8"))
        elif byte_level:
            table.append(bytes(to_byte[c] for c in piece) if all(c in to_byte for c in piece)
                         else piece.encode("utf-8"))
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            table.append(bytes([int(piece[3:5], 16)]))
        else:
            table.append(piece.replace("\u2581", " ").encode("utf-8"))
    return table


def max_token_chars(tokenizer) -> int:
    """The most characters one token can stand for: a text of N characters needs at least
    N / this many tokens, which rejects a hopeless prompt before tokenizing it."""
    return max(1, max((len(b) for b in token_bytes(tokenizer)), default=1))


def _decoder_type(tokenizer) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        import json

        return (json.loads(backend.to_str()).get("decoder") or {}).get("type")
    except Exception:
        return None
