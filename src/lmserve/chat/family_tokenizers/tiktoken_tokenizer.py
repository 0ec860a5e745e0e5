"""GLM-4's tokenizer: a tiktoken BPE over the ranks file its checkpoints call `tokenizer.model`
(one `base64(token bytes) rank` line per token), read with the tiktoken library, as GLM-4's own
ChatGLM4Tokenizer does (same split pattern, no special tokens inside tiktoken).

Control tokens follow the ranks: `<|endoftext|>` = the number of ranks (151329 in GLM-4), then
[MASK], [gMASK], ... in GLM-4's order, unless tokenizer_config.json lists them itself. A
rendered prompt is encoded as GLM-4's tokenizer encodes its chat template's text: split at the
control tokens, each piece between them encoded whole.
Token strings use the GPT-2 byte-level alphabet (the spelling transformers gives converted
tiktoken vocabularies), so every token has a text name and its exact bytes.
"""

from __future__ import annotations

import base64

from transformers import AddedToken, PreTrainedTokenizer

from lmserve.chat.family_tokenizers.role_lines import tokenize_by_message

# ChatGLM4Tokenizer's pre-tokenization pattern.
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GLM4_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                 "<|begin_of_video|>", "<|end_of_video|>")
GLM4_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as the printable character it is spelled with."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def read_ranks(path: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}: line {number} is not 'base64-token rank'") from None
    return ranks


def is_ranks_file(path: str) -> bool:
    """A tiktoken ranks file (GLM-4) rather than a SentencePiece model (ChatGLM3): text lines of
    a base64 token and a rank."""
    with open(path, "rb") as f:
        head = f.read(256)
    line = head.split(b"\n", 1)[0].split()
    if len(line) != 2 or not line[1].isdigit():
        return False
    try:
        base64.b64decode(line[0], validate=True)
    except ValueError:
        return False
    return True


class TiktokenChatTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, controls: dict[int, str] | None = None,
                 role_tokens: tuple[str, ...] = (), pattern: str = GLM4_PATTERN,
                 prefix_tokens: tuple[str, ...] = ("[gMASK]", "<sop>"), **kwargs):
        import tiktoken

        self.vocab_file = vocab_file
        ranks = read_ranks(vocab_file)
        # `tokenizer` is the attribute name GLM-4's class and xgrammar's detection use.
        self.tokenizer = tiktoken.Encoding(name="lmserve-glm4", pat_str=pattern, mergeable_ranks=ranks,
                                           special_tokens={})
        alphabet = byte_level_alphabet()
        self._id_to_bytes = {rank: token for token, rank in ranks.items()}
        self._id_to_str = {rank: "".join(alphabet[b] for b in token) for token, rank in ranks.items()}
        self._str_to_id = {s: i for i, s in self._id_to_str.items()}
        self._rank_count = len(ranks)
        if controls is None:
            controls = {self._rank_count + i: t for i, t in enumerate(GLM4_SPECIALS)}
        self.role_tokens = frozenset(role_tokens)
        self.prefix_tokens = tuple(prefix_tokens)
        self._controls = dict(controls)
        super().__init__(added_tokens_decoder={i: AddedToken(t, special=True, normalized=False)
                                               for i, t in controls.items()},
                         extra_special_tokens=sorted(set(controls.values())), clean_up_tokenization_spaces=False,
                         **kwargs)
        self._update_trie()

    @property
    def vocab_size(self) -> int:
        return max([self._rank_count - 1, *self._controls]) + 1

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._str_to_id)
        vocab.update(self._added_tokens_encoder)
        return vocab

    def tokenize(self, text: str, **kwargs) -> list[str]:
        if kwargs.get("split_special_tokens") or not self.role_tokens:
            return super().tokenize(text, **kwargs)
        return tokenize_by_message(self.tokens_trie.split(text), self._added_tokens_encoder, self.role_tokens,
                                   self._tokenize)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        """A raw prompt with special tokens starts as the family's own tokenizer starts one
        ([gMASK] sop for ChatGLM, <s> for InternLM2, nothing for TeleChat2)."""
        prefix = self.convert_tokens_to_ids(list(self.prefix_tokens))
        return prefix + token_ids_0 + (token_ids_1 or [])

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [self._id_to_str[i] for i in self.tokenizer.encode_ordinary(text)]

    def _convert_token_to_id(self, token: str) -> int:
        return self._str_to_id[token]

    def _convert_id_to_token(self, index: int) -> str:
        return self._id_to_str.get(index, "")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        out: list[str] = []
        run = bytearray()
        for token in tokens:
            if token in self._added_tokens_encoder:
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
                out.append(token)
            elif token in self._str_to_id:
                run += self._id_to_bytes[self._str_to_id[token]]
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_bytes_table(self) -> list[bytes]:
        """Each id's own bytes (control tokens: their text), for logprobs."""
        table = [b""] * self.vocab_size
        for i, b in self._id_to_bytes.items():
            table[i] = b
        for i, t in self._controls.items():
            table[i] = t.encode("utf-8")
        return table

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        import os

        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        with open(path, "wb") as f:
            for rank in sorted(self._id_to_bytes):
                f.write(base64.b64encode(self._id_to_bytes[rank]) + b" " + str(rank).encode() + b"\n")
        return (path,)
