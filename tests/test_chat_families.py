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
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

DATA = Path(__file__).parent / "data"
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


@pytest.fixture(scope="module")
def family_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("families")
    tokenizers = {"tiny-qwen2": _qwen2(work / "qwen2"), "tiny-gemma2": _gemma2(work / "gemma2")}
    config = {"server": {"api_keys": [API_KEY]}, "models": [
        {"id": "tiny-qwen2", "path": str(work / "qwen2"), "dtype": "float32"},
        {"id": "tiny-gemma2", "path": str(work / "gemma2"), "dtype": "float32"},
        # A catalog id served from local weights of its family.
        {"id": "Qwen/Qwen2-1.5B-Instruct", "path": str(work / "qwen2"), "dtype": "float32"}]}
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
