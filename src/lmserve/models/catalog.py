"""The platform's model catalog: every model id it offers, the family its weights must be, the
context it serves, and how it is served.

Ids are the hosted API's names, not Hugging Face repositories (`Qwen/Qwen2.5-72B-Instruct-128K`
is Qwen2.5-72B-Instruct with YaRN x4 switched on; `TeleAI/TeleChat2` covers every TeleChat2
size). `Pro/<id>` is the same weights on their own deployment (own limits and price);
`Vendor-A/<id>` is served by an upstream vendor, not by local weights. A deployment that names a
catalog id is checked at start: its weights' architecture must be the id's family.
"""

from __future__ import annotations

from dataclasses import dataclass

PRO_PREFIX = "Pro/"
VENDOR_PREFIX = "Vendor-A/"

LLAMA = ("LlamaForCausalLM",)
QWEN2 = ("Qwen2ForCausalLM",)
QWEN2_MOE = ("Qwen2MoeForCausalLM",)
GEMMA2 = ("Gemma2ForCausalLM",)
DEEPSEEK_V2 = ("DeepseekV2ForCausalLM",)
CHATGLM = ("ChatGLMModel", "ChatGLMForConditionalGeneration", "GlmForCausalLM")
INTERNLM2 = ("InternLM2ForCausalLM",)
TELECHAT2 = ("TeleChat2ForCausalLM", "TelechatForCausalLM")


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    family: str
    architectures: tuple[str, ...]  # what the weights' config.json may declare
    context_length: int
    notes: str = ""
    weights_id: str = ""  # the id whose weights a Pro/ or Vendor-A/ id serves ("" = its own)
    upstream: bool = False  # served by an upstream vendor (Vendor-A/), not local weights

    @property
    def tier(self) -> str:
        return "pro" if self.id.startswith(PRO_PREFIX) else "standard"


_BASE = [
    CatalogEntry("deepseek-ai/DeepSeek-V2-Chat", "deepseek_v2", DEEPSEEK_V2, 131072,
                 "MLA + DeepSeekMoE, 236B total / 21B active"),
    CatalogEntry("deepseek-ai/DeepSeek-Coder-V2-Instruct", "deepseek_v2", DEEPSEEK_V2, 131072,
                 "MLA + DeepSeekMoE, code"),
    CatalogEntry("deepseek-ai/DeepSeek-V2.5", "deepseek_v2", DEEPSEEK_V2, 131072,
                 "MLA + DeepSeekMoE; tool calls in DeepSeek's own format"),
    CatalogEntry("Qwen/Qwen2.5-72B-Instruct-128K", "qwen2", QWEN2, 131072,
                 "Qwen2.5-72B-Instruct weights with rope_scaling {type: yarn, factor: 4, "
                 "original_max_position_embeddings: 32768} added to config.json"),
    CatalogEntry("Qwen/Qwen2.5-72B-Instruct", "qwen2", QWEN2, 32768),
    CatalogEntry("Qwen/Qwen2.5-32B-Instruct", "qwen2", QWEN2, 32768),
    CatalogEntry("Qwen/Qwen2.5-14B-Instruct", "qwen2", QWEN2, 32768),
    CatalogEntry("Qwen/Qwen2.5-7B-Instruct", "qwen2", QWEN2, 32768),
    CatalogEntry("Qwen/Qwen2.5-Math-72B-Instruct", "qwen2", QWEN2, 4096, "rope_theta 10000"),
    CatalogEntry("Qwen/Qwen2.5-Coder-7B-Instruct", "qwen2", QWEN2, 32768),
    CatalogEntry("Qwen/Qwen2-72B-Instruct", "qwen2", QWEN2, 32768),
    CatalogEntry("Qwen/Qwen2-7B-Instruct", "qwen2", QWEN2, 32768),
    CatalogEntry("Qwen/Qwen2-1.5B-Instruct", "qwen2", QWEN2, 32768, "tied embeddings"),
    CatalogEntry("Qwen/Qwen2-57B-A14B-Instruct", "qwen2_moe", QWEN2_MOE, 65536, "64 experts, top-8, shared expert"),
    CatalogEntry("TeleAI/TeleChat2", "telechat2", TELECHAT2, 8192, "any TeleChat2 size (3B/7B/35B/115B)"),
    CatalogEntry("01-ai/Yi-1.5-34B-Chat-16K", "llama", LLAMA, 16384),
    CatalogEntry("01-ai/Yi-1.5-9B-Chat-16K", "llama", LLAMA, 16384),
    CatalogEntry("01-ai/Yi-1.5-6B-Chat", "llama", LLAMA, 4096),
    CatalogEntry("THUDM/chatglm3-6b", "chatglm", CHATGLM, 8192, "original ChatGLMModel layout"),
    CatalogEntry("THUDM/glm-4-9b-chat", "chatglm", CHATGLM, 131072, "original layout or the -hf GlmForCausalLM one"),
    CatalogEntry("internlm/internlm2_5-7b-chat", "internlm2", INTERNLM2, 32768),
    CatalogEntry("internlm/internlm2_5-20b-chat", "internlm2", INTERNLM2, 32768),
    CatalogEntry("meta-llama/Meta-Llama-3.1-405B-Instruct", "llama", LLAMA, 131072, "llama3 rope scaling"),
    CatalogEntry("meta-llama/Meta-Llama-3.1-70B-Instruct", "llama", LLAMA, 131072, "llama3 rope scaling"),
    CatalogEntry("meta-llama/Meta-Llama-3.1-8B-Instruct", "llama", LLAMA, 131072, "llama3 rope scaling"),
    CatalogEntry("meta-llama/Meta-Llama-3-8B-Instruct", "llama", LLAMA, 8192),
    CatalogEntry("meta-llama/Meta-Llama-3-70B-Instruct", "llama", LLAMA, 8192),
    CatalogEntry("google/gemma-2-27b-it", "gemma2", GEMMA2, 8192, "sliding window 4096 on alternate layers"),
    CatalogEntry("google/gemma-2-9b-it", "gemma2", GEMMA2, 8192, "sliding window 4096 on alternate layers"),
]

_PRO = ["Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2-7B-Instruct", "Qwen/Qwen2-1.5B-Instruct", "01-ai/Yi-1.5-9B-Chat-16K",
        "01-ai/Yi-1.5-6B-Chat", "THUDM/chatglm3-6b", "THUDM/glm-4-9b-chat", "internlm/internlm2_5-7b-chat",
        "meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3.1-8B-Instruct", "google/gemma-2-9b-it"]
_VENDOR = ["Qwen/Qwen2-72B-Instruct", "Qwen/Qwen2.5-72B-Instruct"]


def _derived() -> list[CatalogEntry]:
    base = {e.id: e for e in _BASE}
    out = [CatalogEntry(PRO_PREFIX + i, base[i].family, base[i].architectures, base[i].context_length,
                        "the same weights on their own deployment", weights_id=i) for i in _PRO]
    out += [CatalogEntry(VENDOR_PREFIX + i, base[i].family, base[i].architectures, base[i].context_length,
                         "served by an upstream vendor", weights_id=i, upstream=True) for i in _VENDOR]
    return out


CATALOG: dict[str, CatalogEntry] = {e.id: e for e in _BASE + _derived()}


def lookup(model_id: str) -> CatalogEntry | None:
    return CATALOG.get(model_id)


def check_weights(model_id: str, architecture: str) -> None:
    """Fail when a deployment names a catalog id but its weights are another family's."""
    entry = CATALOG.get(model_id)
    if entry is None or architecture in entry.architectures:
        return
    raise ValueError(f"model id {model_id!r} is a {entry.family} model ({' or '.join(entry.architectures)}), "
                     f"but its weights are {architecture!r}")
