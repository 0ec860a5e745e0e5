"""Each family's chat template, end-of-turn tokens and system-prompt handling, through a real
`lmserve serve` and the openai SDK.

Tiny random Qwen2 and Gemma-2 checkpoints get a byte-level BPE tokenizer trained here with the
family's special tokens and the released checkpoints' chat templates (tests/data). Their final
norm is zeroed, so every logit is 0 and greedy decoding picks token id 0, which is the family's
end-of-turn token (`<|im_end|>`, `<end_of_turn>`) and not the config's eos: a reply that ends at
once with `eos` proves the engine stops on the family's end of turn.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from lmserve.chat.schemas import parse_chat_request
from lmserve.chat.tools import plan_tools, template_messages

DATA = Path(__file__).parents[1] / "data"
CORPUS = ["The weather in Paris is sunny today.", "Call a function to get the weather.",
          "Tools answer with JSON objects.", "Bonjour, comment allez-vous ?"] * 20
API_KEY = "sk-family-test"
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": {"type": "object",
                                                        "properties": {"city": {"type": "string"}}}}}


def _tokenizer(directory: Path, specials: list[str], template: str, **special_names):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **special_names)
    fast.save_pretrained(directory)
    return fast


def _qwen2(directory: Path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = _tokenizer(directory, ["<|im_end|>", "<|endoftext|>", "<|im_start|>"],
                     (DATA / "qwen2_5_chat_template.jinja").read_text(), eos_token="<|endoftext|>")
    config = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(directory)
    return tok


def _gemma2(directory: Path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = _tokenizer(directory, ["<end_of_turn>", "<pad>", "<eos>", "<bos>", "<start_of_turn>"],
                     (DATA / "gemma2_chat_template.jinja").read_text(), bos_token="<bos>", eos_token="<eos>",
                     pad_token="<pad>")
    config = Gemma2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                          sliding_window=16, pad_token_id=1, eos_token_id=2, bos_token_id=3)
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.fill_(-1.0)  # Gemma scales by (1 + w): zero
    model.save_pretrained(directory)
    return tok


# ---- remote-code families: their tokenizers built by lmserve (tests/chat/test_family_tokenizers.py) ----
#
# Their tiny checkpoints answer by a fixed table, whatever the rest of the prompt: every layer's
# output projections are zero (attention and MLP add nothing), so the last hidden state is the
# last token's embedding, a unit vector of that token's slot, and the LM head maps each slot to
# one answer. Slot 0 (every token) answers the family's end of turn where config.json's eos is
# something else (GLM-4's <|user|>, InternLM2's <|im_end|>), so a reply that ends at once with
# `eos` proves the engine stops on it. A "caller" also gives each token of a scripted reply (a tool
# call in the family's format) its own slot answered by the next token: the model writes the call.

H, HEADS, KV, HD, FFN = 32, 2, 1, 16, 48
CALL_ARGS = {"city": "Paris"}


def _weights(shapes: dict, embed: str, head: str, answer: int, script: list[int] = ()) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in shapes.items():
        out[name] = torch.randn(shape, generator=g) * 0.1 if len(shape) == 2 else torch.zeros(shape)
        if "norm" in name or name.endswith("ln_f.weight"):
            out[name] = torch.ones(shape)
        if any(k in name for k in ("dense.", "wo.", "w2.", "dense_4h_to_h.", "down_proj.")):
            out[name] = torch.zeros(shape)
    emb, lm = out[embed], out[head]
    emb.zero_()
    emb[:, 0] = 1.0
    lm.zero_()
    lm[answer, 0] = 1.0
    assert len(set(script)) == len(script), "a scripted reply needs distinct tokens"
    for slot, (token, following) in enumerate(zip(script, script[1:]), start=1):
        emb[token] = 0.0
        emb[token, slot] = 1.0
        lm[following, slot] = 1.0
    return out


def _save(directory: Path, tensors: dict, config: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))


def _append_piece(model: Path, piece: str) -> None:
    """Add a normal piece at the end of a SentencePiece model (a protobuf `pieces` entry: text,
    score): a whole scripted string as one token, which decoding spells back."""
    def varint(n: int) -> bytes:
        out = b""
        while True:
            out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
            n >>= 7
            if not n:
                return out

    text = piece.replace(" ", "\u2581").encode()
    entry = b"\x0a" + varint(len(text)) + text + b"\x15" + struct.pack("<f", -1000.0)
    model.write_bytes(model.read_bytes() + b"\x0a" + varint(len(entry)) + entry)


def _glm4(directory: Path, caller: bool = False):
    from lmserve.chat.family_tokenizers import load_family_tokenizer
    from lmserve.chat.family_tokenizers.tiktoken_tokenizer import byte_level_alphabet

    from .test_family_tokenizers import glm4_dir

    # GLM-4's call after <|assistant|>: the name line, then the JSON arguments, then <|observation|>.
    call = [b"get_weather", b"\n", json.dumps(CALL_ARGS).encode()]
    tok = load_family_tokenizer(glm4_dir(directory, extra_tokens=tuple(call) if caller else ()))
    spell = byte_level_alphabet()  # a token's name: its bytes in GPT-2's alphabet
    script = [tok.convert_tokens_to_ids(t) for t in ("<|assistant|>",)] + [
        tok.convert_tokens_to_ids("".join(spell[b] for b in t)) for t in call] + [
        tok.convert_tokens_to_ids("<|observation|>")] if caller else []
    _save_chatglm(directory, tok, script, rope_ratio=500, eos_token_id=tok.eos_token_id)
    return tok


def _chatglm3(directory: Path, caller: bool = False):
    from lmserve.chat.family_tokenizers import load_family_tokenizer

    from .test_family_tokenizers import chatglm3_dir

    chatglm3_dir(directory)
    # ChatGLM3's call after <|assistant|>: the name line, then a python tool_call(...) block.
    call = "get_weather\n```python\ntool_call(city=\"Paris\")\n```"
    if caller:
        _append_piece(directory / "tokenizer.model", call)
    tok = load_family_tokenizer(directory)
    script = tok.convert_tokens_to_ids(["<|assistant|>", call, "<|observation|>"]) if caller else []
    _save_chatglm(directory, tok, script, eos_token_id=2)
    return tok


def _save_chatglm(directory: Path, tok, script: list[int], **config) -> None:
    """A one-layer checkpoint in the original ChatGLMModel layout (ChatGLM3 and GLM-4 share it)."""
    vocab, p = len(tok), "transformer.encoder.layers.0."
    shapes = {"transformer.embedding.word_embeddings.weight": (vocab, H), "transformer.output_layer.weight": (vocab, H),
              "transformer.encoder.final_layernorm.weight": (H,), p + "input_layernorm.weight": (H,),
              p + "self_attention.query_key_value.weight": ((HEADS + 2 * KV) * HD, H),
              p + "self_attention.query_key_value.bias": ((HEADS + 2 * KV) * HD,),
              p + "self_attention.dense.weight": (H, HEADS * HD), p + "post_attention_layernorm.weight": (H,),
              p + "mlp.dense_h_to_4h.weight": (2 * FFN, H), p + "mlp.dense_4h_to_h.weight": (H, FFN)}
    _save(directory, _weights(shapes, "transformer.embedding.word_embeddings.weight", "transformer.output_layer.weight",
                              tok.convert_tokens_to_ids("<|user|>"), script),
          {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "num_layers": 1, "hidden_size": H,
           "num_attention_heads": HEADS, "multi_query_attention": True, "multi_query_group_num": KV,
           "kv_channels": HD, "ffn_hidden_size": FFN, "layernorm_epsilon": 1e-5, "padded_vocab_size": vocab,
           "seq_length": 1024, "add_qkv_bias": True, "add_bias_linear": False, **config})


def _internlm2(directory: Path, caller: bool = False):
    from lmserve.chat.family_tokenizers import load_family_tokenizer

    from .test_family_tokenizers import internlm2_dir

    internlm2_dir(directory)
    call = "\n" + json.dumps({"name": "get_weather", "parameters": CALL_ARGS})
    if caller:
        _append_piece(directory / "tokenizer.model", call)
    tok = load_family_tokenizer(directory)
    # The prompt ends with "<|im_start|>assistant\n"; the call is an action block, then <|im_end|>.
    script = [tok.encode("assistant\n", add_special_tokens=False)[-1]] + tok.convert_tokens_to_ids(
        ["<|action_start|>", "<|plugin|>"]) + [len(tok) - 1] + tok.convert_tokens_to_ids(
        ["<|action_end|>", "<|im_end|>"]) if caller else []
    vocab, p = len(tok), "model.layers.0."
    shapes = {"model.tok_embeddings.weight": (vocab, H), "output.weight": (vocab, H), "model.norm.weight": (H,),
              p + "attention_norm.weight": (H,), p + "ffn_norm.weight": (H,),
              p + "attention.wqkv.weight": ((HEADS + 2 * KV) * HD, H), p + "attention.wo.weight": (H, HEADS * HD),
              p + "feed_forward.w1.weight": (FFN, H), p + "feed_forward.w3.weight": (FFN, H),
              p + "feed_forward.w2.weight": (H, FFN)}
    _save(directory, _weights(shapes, "model.tok_embeddings.weight", "output.weight",
                              tok.convert_tokens_to_ids("<|im_end|>"), script),
          {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_size": H,
           "num_hidden_layers": 1, "num_attention_heads": HEADS, "num_key_value_heads": KV, "intermediate_size": FFN,
           "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 1024, "vocab_size": vocab,
           "rope_scaling": {"type": "dynamic", "factor": 2.0}, "bias": False, "bos_token_id": 1, "eos_token_id": 2})
    return tok


def _telechat2(directory: Path, caller: bool = False):
    from lmserve.chat.family_tokenizers import load_family_tokenizer

    from .test_family_tokenizers import telechat2_dir

    telechat2_dir(directory)
    call = "\n" + json.dumps({"name": "get_weather", "arguments": CALL_ARGS}) + "\n"
    if caller:
        _append_piece(directory / "tokenizer.model", call)
    tok = load_family_tokenizer(directory)
    # After <_bot>: a hermes-style <tool_call> block, then <_end>.
    script = tok.convert_tokens_to_ids(["<_bot>", "<tool_call>"]) + [len(tok) - 1] + tok.convert_tokens_to_ids(
        ["</tool_call>", "<_end>"]) if caller else []
    vocab, p = len(tok), "transformer.h.0."
    shapes = {"transformer.word_embeddings.weight": (vocab, H), "lm_head.weight": (vocab, H),
              "transformer.ln_f.weight": (H,), p + "input_layernorm.weight": (H,),
              p + "post_attention_layernorm.weight": (H,), p + "self_attention.query.weight": (HEADS * HD, H),
              p + "self_attention.key_value.weight": (2 * KV * HD, H), p + "self_attention.dense.weight": (H, H),
              p + "self_attention.dense.bias": (H,), p + "mlp.gate_proj.weight": (FFN, H),
              p + "mlp.up_proj.weight": (FFN, H), p + "mlp.down_proj.weight": (H, FFN), p + "mlp.down_proj.bias": (H,)}
    _save(directory, _weights(shapes, "transformer.word_embeddings.weight", "lm_head.weight",
                              tok.convert_tokens_to_ids("<_end>"), script),
          {"architectures": ["TeleChat2ForCausalLM"], "model_type": "telechat", "hidden_size": H, "n_layer": 1,
           "n_head": HEADS, "num_key_value_heads": KV, "ffn_hidden_size": FFN, "layer_norm_epsilon": 1e-5,
           "vocab_size": vocab, "training_seqlen": 1024, "base_seqlen": 1024, "bos_token_id": 1, "eos_token_id": 2})
    return tok


REMOTE_CODE_FAMILIES = {"tiny-glm4": _glm4, "tiny-chatglm3": _chatglm3, "tiny-internlm2": _internlm2,
                        "tiny-telechat2": _telechat2}
# The same families scripted to write one get_weather call in their own format.
CALLERS = {f"{name}-caller": build for name, build in REMOTE_CODE_FAMILIES.items()}
CALLERS["tiny-deepseek-v2.5-caller"] = lambda directory, caller: _deepseek_v2_5(directory, caller)


DEEPSEEK_SPECIALS = ["<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                     "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
                     "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
                     "<｜tool▁output▁end｜>"]


def _deepseek_v2_5(directory: Path, caller: bool = False):
    """DeepSeek-V2.5's template and markers; every marker flagged special (the strictest case for
    decoding). config.json's eos is begin-of-sentence, so only the family's end of turn stops.
    The plain model's logits are all zero (greedy picks id 0, end of sentence); the caller writes
    one get_weather call in V2.5's format, scripted as the remote-code callers above are."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    tok = _tokenizer(directory, DEEPSEEK_SPECIALS, (DATA / "deepseek_v2_5_chat_template.jinja").read_text(),
                     bos_token="<｜begin▁of▁sentence｜>", additional_special_tokens=DEEPSEEK_SPECIALS[2:])
    arguments = "get_weather\n```json\n" + json.dumps(CALL_ARGS) + "\n```"
    if caller:
        tok.add_tokens(["function", arguments])  # whole pieces of the call, as single tokens
        tok.save_pretrained(directory)
    config = DeepseekV2Config(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                              qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1,
                              max_position_embeddings=1024, bos_token_id=1, eos_token_id=1)
    model = DeepseekV2ForCausalLM(config)
    with torch.no_grad():
        if caller:
            script = tok.convert_tokens_to_ids(["<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>",
                                                "function", "<｜tool▁sep｜>", arguments, "<｜tool▁call▁end｜>",
                                                "<｜tool▁calls▁end｜>"])
            shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
            weights = _weights(shapes, "model.embed_tokens.weight", "lm_head.weight",
                               tok.convert_tokens_to_ids("<｜end▁of▁sentence｜>"), script)
            weights.update({n: torch.zeros(shape) for n, shape in shapes.items() if "o_proj." in n})
            model.load_state_dict(weights)
        else:
            model.model.norm.weight.zero_()
    model.save_pretrained(directory)
    return tok


@pytest.fixture(scope="module")
def family_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("families")
    tokenizers = {"tiny-qwen2": _qwen2(work / "qwen2"), "tiny-gemma2": _gemma2(work / "gemma2"),
                  "tiny-deepseek-v2.5": _deepseek_v2_5(work / "deepseek")}
    tokenizers.update({name: build(work / name) for name, build in REMOTE_CODE_FAMILIES.items()})
    tokenizers.update({name: build(work / name, caller=True) for name, build in CALLERS.items()})
    config = {"server": {"api_keys": [API_KEY]}, "models": [
        {"id": "tiny-qwen2", "path": str(work / "qwen2"), "dtype": "float32"},
        {"id": "tiny-gemma2", "path": str(work / "gemma2"), "dtype": "float32"},
        {"id": "tiny-deepseek-v2.5", "path": str(work / "deepseek"), "dtype": "float32"},
        # A catalog id served from local weights of its family.
        {"id": "Qwen/Qwen2-1.5B-Instruct", "path": str(work / "qwen2"), "dtype": "float32"},
        *({"id": name, "path": str(work / name), "dtype": "float32"}
          for name in [*REMOTE_CODE_FAMILIES, *CALLERS])]}
    for model in config["models"]:
        # A small KV cache each: on CPU every engine would otherwise take 1 GiB, a dozen of them
        # more memory than a CI machine has.
        model.setdefault("engine", {}).setdefault("num_kv_blocks", 128)
    (work / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = work / "server.log"
    cmd = [sys.executable, "-m", "lmserve", "serve", "--config", str(work / "config.yaml"),
           "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"server exited:\n{log.read_text()}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"server not healthy:\n{log.read_text()}"
            time.sleep(0.25)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY), tokenizers
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _prompt_tokens(tok, messages, **kwargs) -> int:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    return len(tok.encode(text, add_special_tokens=False))


def test_qwen2_stops_on_im_end_with_its_template(family_server):
    client, toks = family_server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model="tiny-qwen2", messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].finish_reason == "eos" and r.choices[0].message.content == ""
    assert r.usage.prompt_tokens == _prompt_tokens(toks["tiny-qwen2"], messages)


def test_qwen2_renders_tools_and_tool_results(family_server):
    client, toks = family_server
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = client.chat.completions.create(model="tiny-qwen2", messages=messages, tools=[TOOL], max_tokens=5,
                                       temperature=0)
    assert r.choices[0].finish_reason == "eos"
    # The template sees the arguments as an object: the prompt holds them once, not re-quoted.
    reference = [messages[0], {"role": "assistant", "content": "",
                               "tool_calls": [{**call, "function": {"name": "get_weather",
                                                                    "arguments": {"city": "Paris"}}}]},
                 messages[2]]
    assert r.usage.prompt_tokens == _prompt_tokens(toks["tiny-qwen2"], reference, tools=[TOOL])


def test_gemma2_system_prompt_is_folded_into_the_first_user_turn(family_server):
    client, toks = family_server
    messages = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(model="tiny-gemma2", messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].finish_reason == "eos" and r.choices[0].message.content == ""
    folded = [{"role": "user", "content": "Answer in French.\n\nHello"}]
    assert r.usage.prompt_tokens == _prompt_tokens(toks["tiny-gemma2"], folded)


def test_gemma2_template_errors_other_than_system_stay_400(family_server):
    client, _ = family_server
    with pytest.raises(openai.BadRequestError, match="alternate"):
        client.chat.completions.create(model="tiny-gemma2", max_tokens=5, messages=[
            {"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_catalog_id_served_from_local_weights(family_server):
    client, _ = family_server
    assert "Qwen/Qwen2-1.5B-Instruct" in {m.id for m in client.models.list()}
    r = client.chat.completions.create(model="Qwen/Qwen2-1.5B-Instruct", max_tokens=3, temperature=0,
                                       messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].finish_reason == "eos"


@pytest.mark.parametrize("model", list(REMOTE_CODE_FAMILIES))
def test_remote_code_families_stop_on_their_end_of_turn(family_server, model):
    """Their prompts are built by lmserve's own tokenizer and template (never the checkpoint's
    code) and generation ends at the family's end-of-turn token, streamed and not."""
    from lmserve.chat.prompt import encode_chat

    client, toks = family_server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "今天天气 in Paris?"}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].finish_reason == "eos" and r.choices[0].message.content == ""
    assert r.usage.prompt_tokens == len(encode_chat(toks[model], messages))
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True))
    assert chunks[-1].choices[0].finish_reason == "eos"


@pytest.mark.parametrize("model", list(REMOTE_CODE_FAMILIES))
def test_remote_code_families_render_tools_and_results(family_server, model):
    from lmserve.chat.prompt import encode_chat

    client, toks = family_server
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = client.chat.completions.create(model=model, messages=messages, tools=[TOOL], max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "eos"
    reference = [messages[0], {"role": "assistant", "content": "",
                               "tool_calls": [{**call, "function": {"name": "get_weather",
                                                                    "arguments": {"city": "Paris"}}}]},
                 messages[2]]
    assert r.usage.prompt_tokens == len(encode_chat(toks[model], reference, tools=[TOOL]))


def test_deepseek_v2_5_stops_on_end_of_sentence_with_its_template(family_server):
    client, toks = family_server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model="tiny-deepseek-v2.5", messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].finish_reason == "eos" and r.choices[0].message.content == ""
    assert r.usage.prompt_tokens == _prompt_tokens(toks["tiny-deepseek-v2.5"], messages)


def test_deepseek_v2_5_renders_tool_calls_and_results(family_server):
    """Its template concatenates the arguments as text and renders the calls only for a turn
    whose content is None: the prompt must hold both calls and both results."""
    client, toks = family_server
    calls = [{"id": f"call_{i}", "type": "function",
              "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
             for i, city in enumerate(["Paris", "Rome"])]
    messages = [{"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "call_0", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_1", "content": "rainy"}]
    r = client.chat.completions.create(model="tiny-deepseek-v2.5", messages=messages, tools=[TOOL], max_tokens=5,
                                       temperature=0)
    assert r.choices[0].finish_reason == "eos"
    # The prompt as DeepSeek-V2.5 writes such a conversation (its template renders no `tools`, so
    # they are described in a system message, which the template puts first).
    system = template_messages(messages, plan_tools(parse_chat_request({"model": "m", "messages": messages,
                                                                         "tools": [TOOL]})), "")[0][0]["content"]
    call = ("<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{{\"city\": \"{}\"}}\n```"
            "<｜tool▁call▁end｜>")
    expected = ("<｜begin▁of▁sentence｜>" + system + "<｜User｜>Weather in Paris and Rome?<｜Assistant｜>"
                "<｜tool▁calls▁begin｜>" + call.format("Paris") + "\n" + call.format("Rome")
                + "<｜tool▁calls▁end｜><｜end▁of▁sentence｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny"
                "<｜tool▁output▁end｜>\n<｜tool▁output▁begin｜>rainy<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")
    tok = toks["tiny-deepseek-v2.5"]
    assert r.usage.prompt_tokens == len(tok.encode(expected, add_special_tokens=False))


def test_deepseek_v2_5_tool_call_markers_survive_decoding(family_server):
    """The markers are special tokens in this tokenizer: decoding keeps them (the tool-call
    reader needs them) while other special tokens stay hidden."""
    from lmserve.chat.tool_parsers.deepseek_v2 import MARKERS
    from lmserve.engine.detokenizer import IncrementalDetokenizer, hidden_special_ids

    tok = family_server[1]["tiny-deepseek-v2.5"]
    section = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{}\n```" \
              "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    ids = tok.encode("<｜begin▁of▁sentence｜>" + section + "<｜User｜>", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, None, hidden_special_ids(tok, MARKERS))
    for i in ids:
        detok.add_token(i)
    assert detok.take_delta(finished=True) == section


@pytest.mark.parametrize("model", list(CALLERS))
def test_tool_calls_in_each_family_format_come_back_as_tool_calls_streamed_and_not(family_server, model):
    """The caller writes one get_weather call in its family's own format (GLM-4: the name line and
    JSON after <|assistant|>; ChatGLM3: the name line and a python tool_call(...) block;
    InternLM2.5: an <|action_start|><|plugin|> block; TeleChat2: a <tool_call> block; DeepSeek-V2.5:
    a <｜tool▁calls▁begin｜> section) and ends its turn: with tools that is a tool call, without tools
    it is text."""
    client, _ = family_server
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model=model, messages=messages, tools=[TOOL], max_tokens=10, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == CALL_ARGS
    chunks = list(client.chat.completions.create(model=model, messages=messages, tools=[TOOL], max_tokens=10,
                                                 temperature=0, stream=True))
    calls = [c for ch in chunks if ch.choices for c in (ch.choices[0].delta.tool_calls or [])]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ""
    assert [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == CALL_ARGS
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    assert "Paris" in plain.choices[0].message.content and plain.choices[0].finish_reason == "eos"
