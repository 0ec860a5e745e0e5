"""The checkpoint's own tokenizer, and what the engine reads off it (each token's bytes). Rendering a
conversation through its chat template is chat/prompt.py."""

from __future__ import annotations

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
