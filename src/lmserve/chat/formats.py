"""Each model family's chat format, keyed by architecture: what ends an assistant turn, how the
family writes tool calls, and which tokens that format is made of.

This is knowledge about the family's conversations, not its network, so it lives here and the
model classes describe only layers and weights. Keys are the architecture a checkpoint's
config.json declares (`architectures[0]`, else resolved from its model_type: models/registry.py),
the same key that picks the model class. The templates themselves come from the checkpoint (or,
for families whose tokenizer is Python code, chat/family_tokenizers/templates.py); rendering one,
system-message folding included, is chat/prompt.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmserve.chat.tool_parsers.deepseek_v2 import MARKERS as DEEPSEEK_V2_TOOL_MARKERS


@dataclass(frozen=True)
class ChatFormat:
    # Tokens that end an assistant turn in the family's chat format: generation stops on them
    # (reported as eos) even where config.json names only the pretraining end of text.
    end_of_turn_tokens: tuple[str, ...] = ()
    # How the family writes tool calls (a format of lmserve.chat.tool_parsers), and the tokens that
    # format is made of: they stay in the decoded text even if the tokenizer flags them special.
    tool_call_format: str = "json"
    tool_call_tokens: tuple[str, ...] = ()


# Llama 3 (<|eot_id|>, <|eom_id|>), and the ChatML checkpoints in Llama's layout (Yi-1.5, SmolLM2).
LLAMA = ChatFormat(("<|eot_id|>", "<|eom_id|>", "<|im_end|>"))
# Qwen2.5: <tool_call>{"name": ..., "arguments": ...}</tool_call>
QWEN2 = ChatFormat(("<|im_end|>", "<|endoftext|>"), "hermes")
# DeepSeek-V2.5's <｜tool▁calls▁begin｜> section.
DEEPSEEK_V2 = ChatFormat(("<｜end▁of▁sentence｜>",), "deepseek_v2", DEEPSEEK_V2_TOOL_MARKERS)
GEMMA2 = ChatFormat(("<end_of_turn>", "<eos>"))
# GLM-4's turn ends: end of text, and the role tokens the model writes to hand the turn over
# (<|user|> after an answer, <|observation|> after a tool call). ChatGLM3 uses the same names, and
# writes its tool calls as python `tool_call(...)` under the tool's name where GLM-4 writes JSON
# arguments: both start with the name line the glm4 reader understands.
GLM = ChatFormat(("<|endoftext|>", "<|user|>", "<|observation|>"), "glm4")
INTERNLM2 = ChatFormat(("<|im_end|>",), "internlm2",
                       ("<|action_start|>", "<|action_end|>", "<|plugin|>", "<|interpreter|>"))
# <tool_call>{"name": ..., "arguments": ...}</tool_call>, special tokens in TeleChat2's vocabulary.
TELECHAT2 = ChatFormat(("<_end>",), "hermes", ("<tool_call>", "</tool_call>"))

_FORMATS: dict[str, ChatFormat] = {
    "LlamaForCausalLM": LLAMA,
    "Qwen2ForCausalLM": QWEN2,
    "Qwen2MoeForCausalLM": QWEN2,
    "DeepseekV2ForCausalLM": DEEPSEEK_V2,
    "Gemma2ForCausalLM": GEMMA2,
    "GlmForCausalLM": GLM,
    "ChatGLMModel": GLM,
    "ChatGLMForConditionalGeneration": GLM,
    "InternLM2ForCausalLM": INTERNLM2,
    "TeleChat2ForCausalLM": TELECHAT2,
    "TelechatForCausalLM": TELECHAT2,  # the 115B copy's spelling
}

# An architecture without an entry: no turn-end tokens beyond the config's own, JSON tool calls.
PLAIN = ChatFormat()


def chat_format(architecture: str) -> ChatFormat:
    """The chat format of a family, by the architecture its config.json declares."""
    return _FORMATS.get(architecture, PLAIN)


def architectures_with_formats() -> list[str]:
    return sorted(_FORMATS)
