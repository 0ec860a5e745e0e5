"""Per-deployment settings, end to end on one server of their own: a `chat_template` file replaces
the checkpoint's template (the prompt is the file's rendering, counted by hand), `generation_config:
checkpoint` makes the checkpoint's generation_config.json the deployment's defaults, and
`tier_limits` is applied when a request is admitted (a free-tier key's third request in a minute
is refused with 429, the same key on another deployment is not)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from .conftest import API_KEY

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHECKPOINT_VALUES = {"temperature": 0.3, "top_p": 0.8, "top_k": 7, "repetition_penalty": 1.1}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, servers):
    import torch

    from tests.support.family_checkpoints import build_llama

    work = tmp_path_factory.mktemp("deployments")
    (work / "template.jinja").write_text(TEMPLATE)
    tiny = work / "tiny-llama"
    torch.manual_seed(0)
    build_llama(tiny)
    (tiny / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                             **CHECKPOINT_VALUES}))
    db_url = f"sqlite:///{work / 'lmserve.db'}"
    config = f"""\
server:
  api_keys: ["{API_KEY}"]
platform:
  database_url: "{db_url}"
models:
  - id: templated
    path: {SMOL}
    dtype: float32
    chat_template: {work / "template.jinja"}
    engine: {{num_kv_blocks: 32}}
  - id: tiered
    path: {SMOL}
    dtype: float32
    tier_limits: {{free: {{rpm: 2}}}}
    engine: {{num_kv_blocks: 32}}
  - id: from-checkpoint
    path: {tiny}
    dtype: float32
    generation_config: checkpoint
    engine: {{num_kv_blocks: 8}}
  - id: platform-defaults
    path: {tiny}
    dtype: float32
    engine: {{num_kv_blocks: 8}}
"""
    created = subprocess.run([sys.executable, "-m", "lmserve", "keys", "create", "--account", "free-co", "--balance",
                              "5", "--json", "--database-url", db_url], capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["tier"] == "free"
    srv = servers.launch(work, config)
    yield srv, key["key"]
    servers.stop(srv)


def _chat(srv, key: str, model: str, content: str = "Hi") -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/chat/completions", timeout=300, headers={"Authorization": f"Bearer {key}"},
                      json={"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 1,
                            "temperature": 0})


def test_chat_template_file_replaces_the_checkpoints(deployed, hf_tokenizer, count_prompt_tokens):
    srv, _ = deployed
    question = "What is the capital of France?"
    r = _chat(srv, API_KEY, "templated", question)
    assert r.status_code == 200, r.text
    # The file's rendering, by hand: no default system turn (SmolLM2's own template adds one).
    by_hand = hf_tokenizer.encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
                                  add_special_tokens=False)
    assert r.json()["usage"]["prompt_tokens"] == len(by_hand)
    assert len(by_hand) < count_prompt_tokens([{"role": "user", "content": question}])


def test_generation_config_checkpoint_gives_the_deployment_defaults(deployed):
    srv, _ = deployed
    cards = {m["id"]: m for m in httpx.get(f"{srv.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"},
                                           timeout=60).json()["data"]}
    assert CHECKPOINT_VALUES.items() <= cards["from-checkpoint"]["defaults"].items(), cards["from-checkpoint"]
    platform = cards["platform-defaults"]["defaults"]  # the same checkpoint, without the switch
    assert all(platform.get(k) != v for k, v in CHECKPOINT_VALUES.items()), platform


def test_tier_limits_are_applied_at_admission(deployed, checks):
    srv, key = deployed
    assert [_chat(srv, key, "tiered").status_code for _ in range(2)] == [200, 200]
    body = checks.error_body(_chat(srv, key, "tiered"), 429)
    assert "RPM" in body["error"]["message"], body
    assert _chat(srv, key, "templated").status_code == 200  # the limit is this deployment's
