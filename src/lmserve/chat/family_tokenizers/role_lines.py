"""ChatGLM3's way of encoding a message: `build_single_message` encodes the role token, then
`metadata + "\\n"`, then the content, each on its own. Tokenizing a rendered prompt the same way
(the first line after a role token separately from the rest) gives the ids that code builds,
where encoding the text between control tokens whole could merge across that newline."""

from __future__ import annotations

from collections.abc import Callable, Collection


def tokenize_by_message(pieces: list[str], controls: Collection[str], role_tokens: frozenset[str],
                        encode: Callable[[str], list[str]]) -> list[str]:
    """`pieces`: the text already split at control tokens (the tokenizer's trie)."""
    out: list[str] = []
    after_role = False
    for piece in pieces:
        if piece in controls:
            out.append(piece)
            after_role = piece in role_tokens
            continue
        if after_role and "\n" in piece:
            head, rest = piece.split("\n", 1)
            out += encode(head + "\n")
            if rest:
                out += encode(rest)
        elif piece:
            out += encode(piece)
        after_role = False
    return out
