"""Tokenizer and chat template, both taken from the checkpoint itself."""

from __future__ import annotations

from pathlib import Path

from lmserve.models.loader import Checkpoint

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(ckpt: Checkpoint):
    """transformers' tokenizer for the checkpoint (a GGUF's embedded tokenizer included). A
    checkpoint directory without tokenizer files gives None: such a model takes token ids only."""
    source, kwargs = ckpt.tokenizer_source
    if ckpt.format == "gguf":
        # The fast-tokenizer class builds straight from the GGUF's vocabulary (~0.2 s). AutoTokenizer
        # would first build the whole model config from the same file with gguf's reader only to
        # pick that class: 3 s more at every start (docs/startup.md).
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        return TokenizersBackend.from_pretrained(source, **kwargs)
    from transformers import AutoTokenizer

    if not any((Path(source) / f).exists() for f in _TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(source, **kwargs)


def render_chat(tokenizer, conversation: list[dict], **template_kwargs) -> str:
    """The prompt text for a conversation, by the checkpoint's own (sandboxed jinja) template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; use generate() with a raw prompt")
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True,
                                         **template_kwargs)
