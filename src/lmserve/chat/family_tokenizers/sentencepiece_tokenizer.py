"""A tokenizer over a SentencePiece `tokenizer.model`, read with the sentencepiece library:
ChatGLM3, InternLM2.5 and TeleChat2 ship one with a Python tokenizer class of their own, which
lmserve never runs. This class does what those classes do:

- text between control tokens is encoded by the SentencePiece model as it is configured (its
  own dummy prefix, byte fallback and normalization), exactly the remote classes' `_tokenize`;
- control tokens are the model's control and user-defined pieces, the ids the checkpoint's
  tokenizer_config.json names (InternLM2 gives unused pieces their chat names), and the ids
  a family appends after the vocabulary (ChatGLM3's role tokens);
- controls named like plain words (ChatGLM3's `sop`, `eop`) are never read from text, or
  "people" would hold an `eop`: they come only from a prefix the template writes as one string
  (`[gMASK]sop`), expanded to its tokens;
- where the family builds each message as `role token + encode(first line + "\\n") +
  encode(content)` (ChatGLM3's `build_single_message`), the first line after a role token is
  encoded on its own, so a rendered template gives the ids that code builds.
"""

from __future__ import annotations

from transformers import AddedToken, PreTrainedTokenizer

from lmserve.chat.family_tokenizers.role_lines import tokenize_by_message


def _special(content: str, special: bool = True) -> AddedToken:
    return AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)


class SentencePieceChatTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, controls: dict[int, str], role_tokens: tuple[str, ...] = (),
                 visible: frozenset[str] = frozenset(), hidden: frozenset[str] = frozenset(),
                 expansions: dict[str, list[str]] | None = None, prefix_tokens: tuple[str, ...] = (), **kwargs):
        import sentencepiece as spm

        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor()
        self.sp_model.Load(vocab_file)
        self.role_tokens = frozenset(role_tokens)
        sp = self.sp_model
        # Control (<s>, </s>), unknown and user-defined pieces are tokens of their own.
        types = piece_types(sp.serialized_model_proto())
        decoder = {i: sp.id_to_piece(i) for i, t in enumerate(types) if t in (_UNKNOWN, _CONTROL, _USER_DEFINED)}
        decoder.update(controls)
        self._piece_count = sp.get_piece_size()
        self._extra = {i: t for i, t in controls.items() if i >= self._piece_count}
        # `hidden` controls keep their ids and names but are no added tokens (never matched in text).
        self._hidden = {t: i for i, t in decoder.items() if t in hidden}
        decoder = {i: t for i, t in decoder.items() if t not in hidden}
        self._expansions = dict(expansions or {})
        self.prefix_tokens = tuple(prefix_tokens)
        # Decoding with skip_special_tokens drops them, except the `visible` ones a tool-call
        # reader must see in the reply (InternLM2's action markers, TeleChat2's <tool_call>).
        super().__init__(added_tokens_decoder={i: _special(t, t not in visible) for i, t in decoder.items()},
                         extra_special_tokens=sorted(set(decoder.values()) - visible),
                         clean_up_tokenization_spaces=False, **kwargs)
        self._update_trie(list(self._expansions))

    @property
    def vocab_size(self) -> int:
        return self._piece_count + len(self._extra)

    def get_vocab(self) -> dict[str, int]:
        # A renamed piece (InternLM2's [UNUSED_TOKEN_146] is <|im_start|>) is listed once, by
        # its chat name, so the vocabulary has one entry per id.
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self._piece_count)
                 if i not in self._added_tokens_decoder}
        vocab.update(self._added_tokens_encoder)
        vocab.update(self._hidden)
        return vocab

    def tokenize(self, text: str, **kwargs) -> list[str]:
        if kwargs.get("split_special_tokens"):
            return self._plain_text(text)
        pieces = [p for piece in self.tokens_trie.split(text) for p in self._expansions.get(piece, [piece])]
        controls = self._added_tokens_encoder.keys() | self._hidden.keys()
        return tokenize_by_message(pieces, controls, self.role_tokens, self._tokenize)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        """A raw prompt with special tokens starts as the family's own tokenizer starts one
        ([gMASK] sop for ChatGLM, <s> for InternLM2, nothing for TeleChat2)."""
        prefix = self.convert_tokens_to_ids(list(self.prefix_tokens))
        return prefix + token_ids_0 + (token_ids_1 or [])

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _plain_text(self, text: str) -> list[str]:
        """Text that must not become control tokens. SentencePiece itself turns user-defined
        pieces (TeleChat2's <_bot>) into their ids wherever they occur, so such a string is
        spelled with byte-fallback pieces instead: the same text, no control token."""
        out: list[str] = []
        for piece in self.tokens_trie.split(text):
            pieces = self._tokenize(piece)
            if piece in self._added_tokens_encoder and any(
                    self.sp_model.piece_to_id(p) in self._added_tokens_decoder for p in pieces):
                byte_pieces = [f"<0x{b:02X}>" for b in piece.encode("utf-8")]
                if all(self.sp_model.is_byte(self.sp_model.piece_to_id(p)) for p in byte_pieces):
                    pieces = byte_pieces
                else:  # no byte fallback: one piece per character, unknown where missing
                    pieces = [p for ch in piece for p in self._tokenize(ch)]
            out += pieces
        return out

    def _convert_token_to_id(self, token: str) -> int:
        hidden = self._hidden.get(token)
        return hidden if hidden is not None else self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        if index < self._piece_count:
            return self.sp_model.id_to_piece(index)
        return self._extra.get(index, "")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Pieces decode through SentencePiece (byte fallback, the dummy-prefix space); control
        tokens are their own text."""
        out: list[str] = []
        run: list[str] = []
        for token in tokens:
            if token in self._added_tokens_encoder or token in self._hidden:
                if run:
                    out.append(self.sp_model.decode_pieces(run))
                    run = []
                out.append(token)
            else:
                run.append(token)
        if run:
            out.append(self.sp_model.decode_pieces(run))
        return "".join(out)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        import os

        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        with open(path, "wb") as f:
            f.write(self.sp_model.serialized_model_proto())
        return (path,)


_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4


def piece_types(proto: bytes) -> list[int]:
    """Each piece's type from a serialized SentencePiece ModelProto (field 1: repeated pieces,
    each with field 3: type, NORMAL when absent). The Python binding exposes is_control and
    is_unknown but not user-defined, and reading the protobuf wire format needs no protobuf."""
    types: list[int] = []
    pos = 0
    while pos < len(proto):
        key, pos = _varint(proto, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(proto, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(proto, pos)
            if field == 1:
                types.append(_piece_type(proto[pos:pos + size]))
            pos += size
        else:
            raise ValueError("malformed SentencePiece model")
    return types


def _piece_type(message: bytes) -> int:
    pos, kind = 0, 1
    while pos < len(message):
        key, pos = _varint(message, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(message, pos)
            if field == 3:
                kind = value
        elif wire == 5:
            pos += 4
        elif wire == 1:
            pos += 8
        elif wire == 2:
            size, pos = _varint(message, pos)
            pos += size
        else:
            raise ValueError("malformed SentencePiece model")
    return kind


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("malformed SentencePiece model")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
