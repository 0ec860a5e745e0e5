"""A conversation as the model's prompt: the checkpoint's own chat template rendered (sandboxed
jinja), system messages folded into the user turn for templates that refuse them, and the result
tokenized so that only the template's markup becomes control tokens (never text the client wrote).
"""

from __future__ import annotations

import json
import re
import secrets


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
