"""The built-in chat formats of the families whose checkpoints ship a remote-code tokenizer.

Their own prompt building lives in Python (ChatGLM3's and GLM-4's `build_chat_input`), in a
template that only works beside that code, or without tool support (InternLM2.5's), so lmserve
renders them with these templates, written from each family's documented format (MODEL_FAMILIES.md
§6, §7, §9). Every template takes OpenAI-style messages (tool-call arguments as objects) and the
`tools` list, and ends with the family's generation prompt.

Sources:
- GLM-4: the `chat_template` of THUDM/glm-4-9b-chat's tokenizer_config.json (prefix, the tools
  system block word for word, `<|role|>{metadata}\\n{content}`), with calls written as GLM-4
  emits them (`<|assistant|>{name}\\n{json arguments}`) and results as `<|observation|>`.
- ChatGLM3: `build_chat_input` of THUDM/chatglm3-6b's tokenization_chatglm.py and its tool demo
  (tools appended to the system text as indented JSON; a call is `<|assistant|>{name}\\n` and a
  python `tool_call(...)` block).
- InternLM2.5: InternLM's chat_format.md (ChatML with `<s>`, tools in a
  `system name=<|plugin|>` turn, calls in `<|action_start|><|plugin|>` ... `<|action_end|>`,
  results in an `environment name=<|plugin|>` turn).
- TeleChat2: the chat template of TeleChat2's predict script (`<_system>` with a default
  identity, `<_user>`, `<_bot>` ... `<_end>`, hermes-style `<tool_call>` blocks, results in
  `<tool_response>` blocks of a user turn).
"""

GLM4_TOOLS_SYSTEM = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                     "你的任务是针对用户的问题和要求提供适当的答复和支持。")

GLM4 = (
    "[gMASK]<sop>"
    "{% if tools %}<|system|>\n" + GLM4_TOOLS_SYSTEM + "\n\n# 可用工具"
    "{% for tool in tools %}{% set f = tool.function if tool.function is defined else tool %}"
    "{{ '\\n' }}\n## {{ f.name }}\n\n{{ f | tojson(indent=4) }}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
    "{% endfor %}{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|observation|>\n{{ m.content }}"
    "{% elif m.role == 'assistant' and m.tool_calls %}"
    "{% if m.content %}<|assistant|>\n{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls %}<|assistant|>{{ c.function.name }}\n{{ c.function.arguments | tojson }}{% endfor %}"
    "{% elif m.content %}<|{{ 'system' if m.role == 'developer' else m.role }}|>\n{{ m.content }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CHATGLM3_TOOLS_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"

CHATGLM3 = (
    "[gMASK]sop"
    "{% set ns = namespace(tools_done=false) %}"
    "{% if tools and messages[0].role not in ('system', 'developer') %}"
    "<|system|>\n" + CHATGLM3_TOOLS_SYSTEM + "\n{{ tools | map(attribute='function') | list | tojson(indent=4) }}"
    "{% set ns.tools_done = true %}{% endif %}"
    "{% for m in messages %}"
    "{% if m.role in ('system', 'developer') %}<|system|>\n{{ m.content }}"
    "{% if tools and not ns.tools_done %}{{ '\\n' }}{{ tools | map(attribute='function') | list | tojson(indent=4) }}"
    "{% set ns.tools_done = true %}{% endif %}"
    "{% elif m.role == 'tool' %}<|observation|>\n{{ m.content }}"
    "{% elif m.role == 'assistant' and m.tool_calls %}"
    "{% if m.content %}<|assistant|>\n{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls %}<|assistant|>{{ c.function.name }}\n```python\ntool_call("
    "{% for k, v in c.function.arguments.items() %}{{ ', ' if not loop.first }}{{ k }}={{ v | tojson }}{% endfor %}"
    ")\n```{% endfor %}"
    "{% else %}<|{{ m.role }}|>\n{{ m.content }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

INTERNLM2 = (
    "{{ bos_token }}"
    "{% set ns = namespace(plugins_done=not tools) %}"
    "{% for m in messages %}"
    "{% if m.role in ('system', 'developer') %}<|im_start|>system\n{{ m.content }}<|im_end|>\n"
    "{% else %}"
    "{% if not ns.plugins_done %}<|im_start|>system name=<|plugin|>\n"
    "{{ tools | map(attribute='function') | list | tojson }}<|im_end|>\n{% set ns.plugins_done = true %}{% endif %}"
    "{% if m.role == 'tool' %}<|im_start|>environment name=<|plugin|>\n{{ m.content }}<|im_end|>\n"
    "{% elif m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<|action_start|><|plugin|>\n"
    "{{ {'name': c.function.name, 'parameters': c.function.arguments} | tojson }}<|action_end|>{% endfor %}"
    "<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endif %}{% endif %}{% endfor %}"
    "{% if not ns.plugins_done %}<|im_start|>system name=<|plugin|>\n"
    "{{ tools | map(attribute='function') | list | tojson }}<|im_end|>\n{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TELECHAT2_SYSTEM = ("你是中国电信星辰语义大模型，英文名是TeleChat，"
                    "你是由中电信人工智能科技有限公司和中国电信人工智能研究院（TeleAI）研发的人工智能助手。")

TELECHAT2 = (
    "{% set has_system = messages and messages[0].role in ('system', 'developer') %}"
    "<_system>{{ messages[0].content if has_system else '" + TELECHAT2_SYSTEM + "' }}"
    "{% if tools %}{{ '\\n' }}\n# 可用工具\n"
    "你可以调用<tools></tools>标签中包含的一个或多个工具来辅助你回答问题,以下是可用工具详情：\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n\n# 调用方法\n"
    "你需要遵循工具的要求，使用json格式返回工具名称及参数，并用<tool_call></tool_call>包含。下方是一个调用模板：\n"
    "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>\n\n"
    "{% else %}{{ '\\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'user' %}<_user>{{ m.content }}"
    "{% elif m.role == 'assistant' %}<_bot>{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}{{ '\\n' if not loop.first }}<tool_call>\n"
    "{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}\n</tool_call>"
    "{% endfor %}<_end>\n"
    "{% elif m.role == 'tool' %}"
    "{{ '<_user>' if loop.first or messages[loop.index0 - 1].role != 'tool' else '\\n' }}"
    "<tool_response>\n{{ m.content }}\n</tool_response>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<_bot>{% endif %}"
)
