"""Chat templates and tool calls: the MiniMax-Text-01 format rendered as transformers renders it
(tools, tool results through the `function` role, content parts), the probes that adapt a
conversation to what a template shows, OpenAI's conversation rules, and parsing the model's
calls back (whole and streamed)."""

import json

import pytest

from chat_templates import TEXT01, WEATHER

from minimax01.infer.chat import ChatTemplate
from minimax01.infer.request import RequestError
from minimax01.infer.tools import ToolCallStream, format_call, parse_tool_calls
from minimax01.tokenizer import ByteTokenizer

CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CONVERSATION = [
    {"role": "developer", "content": "You are helpful."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in "},
                                 {"type": "text", "text": "Paris?"}]},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
]
B, E = "<beginning_of_sentence>", "<end_of_sentence>\n"


def test_text01_template_with_tools():
    t = ChatTemplate(ByteTokenizer(), TEXT01)
    assert (t.parts, t.tool_role, t.shows_tool_calls, t.shows_tools) == \
        (True, "function", False, True)
    got = t.render(CONVERSATION, [WEATHER])
    want = (f"{B}system ai_setting=assistant\nYou are helpful.{E}"
            f"{B}user name=user\nWeather in Paris?{E}"
            f"{B}ai name=assistant\n```typescript\nfunctions.get_weather({{\"city\": \"Paris\"}})"
            f"\n```{E}"
            f"{B}system function_response=functions\n"
            f"{{\"name\": \"get_weather\", \"response\": {{\"temp\": 21}}}}{E}"
            f"{B}system function_setting=functions\n{json.dumps(WEATHER)}{E}"
            f"{B}ai name=assistant\n")
    assert got == want
    assert "<now> & later" in got  # tojson as transformers': no HTML escaping
    assert t.render(CONVERSATION[:2], prefix="X").endswith(f"{B}ai name=assistant\nX")


def test_text01_rendering_equals_transformers():
    chat_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    t = ChatTemplate(ByteTokenizer(), TEXT01)
    # what our probes hand the template: parts, the function role with the looked-up name
    adapted = [
        {"role": "system", "content": [{"type": "text", "text": "You are helpful."}]},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": format_call(
            "get_weather", '{"city": "Paris"}')}]},
        {"role": "function", "name": "get_weather",
         "content": [{"type": "text", "text": '{"temp": 21}'}]},
    ]
    hf = chat_utils.render_jinja_template(conversations=[adapted], tools=[WEATHER],
                                          chat_template=TEXT01, add_generation_prompt=True)
    hf = hf[0][0] if isinstance(hf, tuple) else hf
    hf = hf[0] if isinstance(hf, list) else hf
    assert t.render(CONVERSATION, [WEATHER]) == hf


def test_default_template_and_a_template_that_shows_tool_messages():
    t = ChatTemplate(ByteTokenizer())
    got = t.render(CONVERSATION, [WEATHER])
    assert got == ("<|system|>\nYou are helpful.\n<|user|>\nWeather in Paris?\n<|assistant|>\n"
                   + format_call("get_weather", '{"city": "Paris"}') + "\n"
                   "<|tool|>\n{\"temp\": 21}\n"
                   f"<|functions|>\n{json.dumps(WEATHER)}\n<|assistant|>\n")

    class Tok(ByteTokenizer):
        chat_template = ("{% for m in messages %}[{{ m.role }}{% if m.name %}:{{ m.name }}"
                         "{% endif %}]{{ m.content }}{% for c in m.tool_calls or [] %}"
                         "<call {{ c.function.name }}>{% endfor %}{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}")

    t = ChatTemplate(Tok())
    assert t.name == "tokenizer" and (t.parts, t.tool_role, t.shows_tool_calls) == \
        (False, "tool", True)
    assert t.render(CONVERSATION) == ("[system]You are helpful.[user]Weather in Paris?"
                                      "[assistant]<call get_weather>[tool:get_weather]"
                                      "{\"temp\": 21}[assistant]")
    with pytest.raises(RequestError) as e:  # it never looks at `tools`
        t.render(CONVERSATION, [WEATHER])
    assert e.value.param == "tools"


def test_template_errors_name_the_messages():
    class Tok(ByteTokenizer):
        chat_template = ("{% for m in messages %}{% if m.role == 'assistant' and loop.first %}"
                         "{{ raise_exception('the first message must not be the assistant') }}"
                         "{% endif %}[{{ m.role }}]{{ m.content }}{% endfor %}")

    t = ChatTemplate(Tok())
    assert t.render([{"role": "user", "content": "hi"}]) == "[user]hi"
    with pytest.raises(RequestError, match="must not be the assistant") as e:
        t.render([{"role": "assistant", "content": "hi"}])
    assert e.value.param == "messages"


@pytest.mark.parametrize("messages,param", [
    ([], "messages"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}],
     "messages[1].tool_call_id"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "r", "tool_call_id": "c"}],
     "messages[1].tool_call_id"),
    ([{"role": "user", "content": "x", "tool_call_id": "c"}], "messages[0].tool_call_id"),
    ([{"role": "user", "content": "x", "tool_calls": [CALL]}], "messages[0].tool_calls"),
    ([{"role": "function", "content": "r"}], "messages[0].name"),
])
def test_conversation_rules(messages, param):
    for template in (None, TEXT01):
        with pytest.raises(RequestError) as e:
            ChatTemplate(ByteTokenizer(), template).render(messages)
        assert e.value.param == param


def test_parse_tool_calls():
    names = {"get_weather", "add"}
    text = ('Checking.\n<function_call>```typescript\nfunctions.get_weather({"city": "Paris"})'
            '\n```\n```typescript\nfunctions.add({"a": 1, "b": [2, ")"]})\n```')
    content, calls = parse_tool_calls(text, names)
    assert content == "Checking."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == \
        [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": [2, ")"]})]
    assert len({c.id for c in calls}) == 2 and calls[0].to_openai(0)["index"] == 0
    for not_a_call in ['```typescript\nfunctions.unknown({})\n```',        # not offered
                       '```typescript\nfunctions.add({"a": )\n```',         # not JSON
                       '```typescript\nfunctions.add([1, 2])\n```',         # not an object
                       'functions.add({"a": 1})', "plain text"]:
        assert parse_tool_calls(not_a_call, names) == (not_a_call, [])


def test_tool_call_stream_holds_back_only_what_may_be_a_call():
    text = 'Let me check ``` that.\n```typescript\nfunctions.add({"a": 1})\n``` done'
    s = ToolCallStream({"add"})
    out = "".join(s.push(ch) for ch in text)
    assert out == "Let me check ``` that.\n"  # the lone ``` was released once it could not grow
    content, calls = s.finish()
    assert content == "done" and [c.name for c in calls] == ["add"]
    s = ToolCallStream({"add"})
    assert "".join(s.push(ch) for ch in "no calls ```typesc") == "no calls "
    assert s.finish() == ("```typesc", [])
    # a forced call: the prefix is in the prompt, the model writes the rest
    s = ToolCallStream({"add"}, prefix="```typescript\nfunctions.add(")
    assert s.push('{"a": 2})\n```') == ""
    content, calls = s.finish()
    assert content == "" and calls[0].arguments == '{"a": 2}'
    s = ToolCallStream({"add"}, prefix="```typescript\nfunctions.add(")
    s.push("oops")
    assert s.finish() == ("oops", [])
