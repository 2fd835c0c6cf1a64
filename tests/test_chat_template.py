"""Chat templates render exactly as transformers' apply_chat_template does."""

import pytest
from transformers import AutoTokenizer

from qwenkit.errors import QwenkitError
from qwenkit.tokenizer.chat_template import CHATML_TEMPLATE, ChatTemplate
from tiny_models import tiny_tokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo actuelle d'une ville",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

# A Qwen3-style template: thinking on/off via enable_thinking, tools, reasoning in history.
QWEN3_STYLE = """{%- if tools %}<|im_start|>system
{%- if messages[0].role == 'system' %}
{{ messages[0].content }}
{%- endif %}
# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{%- if message.reasoning_content %}
<think>
{{ message.reasoning_content }}
</think>
{% endif %}
{{ message.content }}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role not in ['system'] %}{{ raise_exception('unknown role ' + message.role) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}
{%- endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Bonjour ! 你好"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"temp": "18°C"}'},
    ],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "reasoning_content": "greet back"},
        {"role": "user", "content": "bye"},
    ],
]


def reference_render(template, messages, **kwargs):
    tok = tiny_tokenizer(chat_template=template)
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


def ours(template, **kwargs):
    special = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None}
    return ChatTemplate(template, special).render(**kwargs)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"enable_thinking": True}, {"tools": [WEATHER_TOOL]}])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_qwen3_style_template_matches_transformers(messages, kwargs, add_generation_prompt):
    expected = reference_render(QWEN3_STYLE, messages, add_generation_prompt=add_generation_prompt, **kwargs)
    assert ours(QWEN3_STYLE, messages=messages, add_generation_prompt=add_generation_prompt, **kwargs) == expected


def test_default_model_template_with_tools_matches_transformers(default_model):
    from qwenkit.weights.default_model import ensure_assembled

    gguf = ensure_assembled()
    reference = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for messages in CONVERSATIONS[:3]:
        for tools in (None, [WEATHER_TOOL]):
            expected = reference.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
            got = default_model.tokenizer.chat_template.render(messages, tools=tools, add_generation_prompt=True)
            assert got == expected
    # tojson keeps non-ASCII as is, as transformers does.
    assert "Météo" in default_model.tokenizer.chat_template.render(CONVERSATIONS[0], tools=[WEATHER_TOOL])


def test_builtin_chatml_matches_transformers():
    for messages in CONVERSATIONS[:2]:
        assert ours(None, messages=messages, add_generation_prompt=True) == reference_render(
            CHATML_TEMPLATE, messages, add_generation_prompt=True
        )


def test_raise_exception_becomes_a_clear_error():
    with pytest.raises(QwenkitError, match="unknown role narrator"):
        ours(QWEN3_STYLE, messages=[{"role": "user", "content": "a"}, {"role": "narrator", "content": "b"}])
