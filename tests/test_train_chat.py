"""ChatRenderer: conversations -> tokens and an assistant-only loss mask."""

import json

import pytest
import torch

from minimax01.infer.chat import TEXT01_TEMPLATE as TEXT01
from minimax01.infer.chat import ChatTemplate
from minimax01.tokenizer import ByteTokenizer
from minimax01.train.data.chat import ChatError, ChatRenderer
from minimax01.train.data.chat_data import ChatJsonlFile, ChatPacker
from minimax01.train.data.packing import TokenStream

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


def test_from_pretrained_folder(tmp_path):
    ByteTokenizer().save(tmp_path)
    assert ChatRenderer.from_pretrained(tmp_path).template.source == TEXT01  # no template: Text-01's
    (tmp_path / "chat_template.jinja").write_text(TINY)
    ids, mask = ChatRenderer.from_pretrained(tmp_path).render(TWO_TURNS)
    assert bytes(ids) == b"<u>hi|<a>yo|<u>q|<a>ok|" and sum(mask) == 6


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


# ---------------------------------------------------------------------- packing (chat_data.py)
def _chat_file(path, convs, extra_lines=()):
    with open(path, "w") as f:
        for c in convs:
            f.write(json.dumps({"messages": c}) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def _conv(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def _packer(path, seq_len, strict=False):
    shard = ChatJsonlFile(path, path.name, ChatRenderer(ByteTokenizer(), TINY), strict)
    stream = TokenStream([shard], ByteTokenizer(), "train", shuffle=False)
    return ChatPacker(stream, seq_len, pad_id=258)


def test_packed_rows_by_hand(tmp_path, capsys):
    path = _chat_file(tmp_path / "c.jsonl", [_conv("hi", "yo"), _conv("q", "ok"),
                                             _conv("hi", "yo")],
                      ["not json", json.dumps({"messages": [{"role": "user", "content": 1}]}),
                       json.dumps({"messages": [{"role": "user", "content": "no answer"}]})])
    packer = _packer(path, 24)
    inputs, targets, lengths = packer.next_row()
    a = [60, 117, 62, 104, 105, 124, 60, 97, 62, 121, 111, 124]   # "<u>hi|<a>yo|"
    b = [60, 117, 62, 113, 124, 60, 97, 62, 111, 107, 124]        # "<u>q|<a>ok|"
    X = -100
    assert inputs == a + b + [258]
    # a target where the next token is the assistant's: "yo|" and "ok|", nothing across
    assert targets == [X] * 8 + [121, 111, 124, X] + [X] * 7 + [111, 107, 124, X] + [X]
    assert lengths == [12, 11, 1]  # the third conversation does not fit: it starts row 2
    inputs, targets, lengths = packer.next_row()  # the third, then the next epoch's first
    assert inputs == a + a and lengths == [12, 12]
    assert packer.next_row()[0] == b + a + [258]
    err = capsys.readouterr().err
    assert "line 4: not valid JSON" in err
    assert "line 5: messages[0].content: must be a string" in err
    assert "line 6: no assistant message" in err


def test_long_conversation_is_cut_to_the_row(tmp_path):
    packer = _packer(_chat_file(tmp_path / "c.jsonl", [_conv("x" * 30, "yes"), _conv("q", "ok")]), 16)
    inputs, targets, lengths = packer.next_row()
    assert lengths == [16] and bytes(inputs) == b"<u>" + b"x" * 13 and packer.truncated == 1
    assert packer.next_row()[2] == [11, 5]


def test_strict_chat_data(tmp_path):
    path = _chat_file(tmp_path / "c.jsonl", [_conv("a", "b")], ['{"messages": 5}'])
    with pytest.raises(ValueError, match=r"line 2: messages: must be a list.*data.strict"):
        for _ in range(3):
            _packer(path, 16, strict=True).next_row()


def test_resume_mid_stream(tmp_path):
    path = _chat_file(tmp_path / "c.jsonl", [_conv(str(i) * (i % 4 + 1), "ok" * (i % 3 + 1))
                                             for i in range(9)])
    packer = _packer(path, 20)
    packer.next_row()
    state = packer.stream.state_dict()
    expected = [packer.next_row() for _ in range(4)]
    again = _packer(path, 20)
    again.stream.load_state_dict(state)
    assert [again.next_row() for _ in range(4)] == expected


def test_packed_loss_equals_per_conversation_loss(tmp_path):
    from minimax01 import MiniMaxForCausalLM
    from minimax01.config import ModelConfig
    from minimax01.train.data import collate

    convs = [_conv("hi", "yo"), _conv("what?", "fine"), _conv("q", "ok")]
    packer = _packer(_chat_file(tmp_path / "c.jsonl", convs), 48)
    batch = collate([packer.next_row()])
    assert batch["cu_seqlens"].tolist() == [0, 12, 29, 40, 48]
    torch.manual_seed(0)
    model = MiniMaxForCausalLM(ModelConfig.from_preset("debug", vocab_size=259)).float()
    out = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"])
    packed = model.lm_loss(out.logits, batch["labels"], shift_labels=False, reduction="none")
    renderer = ChatRenderer(ByteTokenizer(), TINY)
    total, count = 0.0, 0
    for c in convs:
        ids, learn = renderer.render(c)
        labels = torch.tensor([ids[j + 1] if learn[j + 1] else -100 for j in range(len(ids) - 1)]
                              + [-100])[None]
        logits = model(torch.tensor(ids)[None]).logits
        total = total + model.lm_loss(logits, labels, shift_labels=False, reduction="none").sum()
        count += int((labels != -100).sum())
    assert count == batch["num_targets"] == 3 + 5 + 3  # "yo|", "fine|", "ok|"
    torch.testing.assert_close(packed.sum(), total, rtol=1e-5, atol=1e-5)
