"""ChatRenderer: conversations -> tokens and an assistant-only loss mask."""

import pytest

from minimax01.infer.chat import ChatTemplate
from minimax01.tokenizer import ByteTokenizer
from minimax01.train.data.chat import ChatError, ChatRenderer

TINY = ("{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}|{% endfor %}"
        "{% if add_generation_prompt %}<a>{% endif %}")
TWO_TURNS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
             {"role": "user", "content": "q"}, {"role": "assistant", "content": "ok"}]


def test_hand_computed_two_turns():
    ids, mask = ChatRenderer(ByteTokenizer(), TINY).render(TWO_TURNS)
    # "<u>hi|<a>" "yo|" "<u>q|<a>" "ok|" as bytes: < 60, u 117, > 62, h 104, i 105, | 124,
    # a 97, y 121, o 111, q 113, k 107
    assert ids == [60, 117, 62, 104, 105, 124, 60, 97, 62, 121, 111, 124,
                   60, 117, 62, 113, 124, 60, 97, 62, 111, 107, 124]
    F, T = False, True
    assert mask == [F] * 9 + [T, T, T] + [F] * 8 + [T, T, T]


def test_text01_fallback_learns_answer_and_end_of_turn():
    r = ChatRenderer(ByteTokenizer())  # no template on the tokenizer: MiniMax-Text-01's
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    ids, mask = r.render(msgs)
    assert bytes(ids).decode() == r.text(msgs)
    spans, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(bytes(cur).decode())
            cur = []
    assert spans == ["Hello!<end_of_sentence>", "4<end_of_sentence>"]
    assert not mask[-1]  # the newline after the end-of-turn token is formatting, not learned
    # the context of the second answer is exactly the prompt `serve` would build
    prompt = ChatTemplate(ByteTokenizer(), r.template.source).render(msgs[:4])
    first = len(prompt.encode())
    assert bytes(ids[:first]).decode() == prompt and mask[first] and not mask[first - 1]


def test_assistant_first_and_no_assistant():
    r = ChatRenderer(ByteTokenizer(), TINY)
    ids, mask = r.render([{"role": "assistant", "content": "x"}])
    assert bytes(ids) == b"<a>x|" and mask == [False] * 3 + [True] * 2
    ids, mask = r.render([{"role": "user", "content": "x"}])
    assert bytes(ids) == b"<u>x|" and not any(mask)


@pytest.mark.parametrize("messages, where", [
    ([], "messages:"),
    ("hello", "messages:"),
    ([{"role": "user", "content": "a"}, {"content": "b"}], "messages[1].role: missing"),
    ([{"role": "robot", "content": "a"}], "messages[0].role"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 7}], "messages[1].content"),
    ([{"role": "user", "content": ["a"]}], "messages[0].content"),
    ([{"role": "user", "content": "a"}, 3], "messages[1]:"),
])
def test_bad_messages_name_the_field(messages, where):
    with pytest.raises(ChatError) as e:
        ChatRenderer(ByteTokenizer(), TINY).render(messages)
    assert str(e.value).startswith(where)
    assert isinstance(e.value, ValueError)


def test_template_that_is_not_a_growing_prefix():
    # the tools after the last turn (as MiniMax-Text-01's template puts them)
    tail = TINY.replace("{% if add_generation_prompt %}", "{% for t in tools or [] %}{{ t.function.name }}{% endfor %}"
                        "{% if add_generation_prompt %}")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with pytest.raises(ChatError, match=r"messages\[1\]: the chat template"):
        ChatRenderer(ByteTokenizer(), tail).render(TWO_TURNS, tools)
    ids, mask = ChatRenderer(ByteTokenizer(), tail).render(TWO_TURNS)  # without tools it is
    assert sum(mask) == 6
