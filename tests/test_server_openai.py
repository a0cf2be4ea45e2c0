"""OpenAI API conformance, with the official `openai` Python SDK as the client against a real
server on a socket. Where the output must be known (tool calls, stop strings, offsets) the
model's next tokens are forced by ScriptedEngine, which only replaces the logits: sampling,
detokenization, stop handling and the HTTP layer are the real ones."""

import json

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from chat_templates import TEXT01, WEATHER  # noqa: E402
from server_utils import expected_text, running  # noqa: E402

from minimax01 import ModelConfig, MiniMaxForCausalLM  # noqa: E402
from minimax01.infer.engine import Engine  # noqa: E402
from minimax01.infer.server import create_app  # noqa: E402
from minimax01.tokenizer import ByteTokenizer  # noqa: E402

KEY = "sk-sdk"
CALL_TEXT = 'Let me check.```typescript\nfunctions.get_weather({"city": "Paris"})\n```'


class ScriptedEngine(Engine):
    """While `script` is set, every request's next token is the next byte of it (then eos)."""

    script: str | None = None
    prompts: list[str] = []

    def _sample(self, rows, logits):
        if self.script is None:
            return super()._sample(rows, logits)
        ids = self.tokenizer.encode(self.script) + [self.eos_id]
        forced = torch.full_like(logits, -1e4)
        for i, seq in enumerate(rows):
            if not seq.output_ids:
                self.prompts.append(self.tokenizer.decode(seq.prompt_ids))
            forced[i, ids[min(len(seq.output_ids), len(ids) - 1)]] = 0.0
        return super()._sample(rows, forced)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MiniMaxForCausalLM(ModelConfig.from_preset("debug")).eval()


@pytest.fixture(scope="module")
def setup(model):
    tok = ByteTokenizer()
    engine = ScriptedEngine(model, tok, num_slots=4, max_context=2048, prefill_chunk=512)
    app = create_app(engine, tok, model_name="debug", api_key=KEY, chat_template=TEXT01)
    with running(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        yield client, engine, tok


@pytest.fixture
def scripted(setup):
    client, engine, tok = setup

    def use(text):
        engine.script = text
        engine.prompts.clear()
    yield use
    engine.script = None


def test_models(setup):
    client, *_ = setup
    assert [m.id for m in client.models.list()] == ["debug"]
    m = client.models.retrieve("debug")
    assert m.id == "debug" and m.object == "model" and m.owned_by == "minimax01"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(client.base_url), api_key="wrong",
                      max_retries=0).models.list()


def test_completions_accept_what_the_sdk_sends(setup, model):
    client, _, tok = setup
    ids = tok.encode("Hello", add_bos=True)
    want = expected_text(model, tok, ids, 16)
    r = client.completions.create(model="debug", prompt="Hello", max_tokens=None,
                                  temperature=0, top_p=None, logit_bias={}, best_of=1,
                                  suffix=None, echo=False, n=1, stop=None, seed=None,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == "debug"
    assert r.usage.completion_tokens == 16  # max_tokens null: OpenAI's default of 16
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    # temperature null is the default (1.0): a seeded sample, reproducible
    a, b = (client.completions.create(model="debug", prompt="Hello", temperature=None,
                                      max_tokens=8, seed=7).choices[0].text for _ in range(2))
    assert a == b
    # echo
    r = client.completions.create(model="debug", prompt="Hello", max_tokens=4, temperature=0,
                                  echo=True, extra_body={"ignore_eos": True})
    assert r.choices[0].text == "Hello" + expected_text(model, tok, ids, 4)


def test_logit_bias_is_applied(setup):
    client, *_ = setup
    r = client.completions.create(model="debug", prompt="Hello", max_tokens=5, temperature=0,
                                  logit_bias={str(ord("z")): 100},
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == "zzzzz"
    r = client.chat.completions.create(model="debug", max_tokens=4, temperature=1.0, seed=1,
                                       messages=[{"role": "user", "content": "hi"}],
                                       logit_bias={str(ord("q")): 100, str(ord("z")): -100},
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == "qqqq"


def test_chat_accepts_what_the_sdk_sends(setup, scripted):
    client, engine, _ = setup
    scripted("It is sunny.")
    r = client.chat.completions.create(
        model="debug", temperature=None, top_p=None, response_format={"type": "text"},
        messages=[{"role": "developer", "content": "Answer briefly."},
                  {"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "call_9", "type": "function",
                       "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                  {"role": "tool", "tool_call_id": "call_9", "content": '{"sky": "clear"}'}],
        tools=[WEATHER], parallel_tool_calls=False, store=False, metadata={"a": "b"}, user="u")
    assert r.choices[0].message.content == "It is sunny."
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
    prompt = engine.prompts[-1]
    assert "<beginning_of_sentence>system ai_setting=assistant\nAnswer briefly." in prompt
    assert ('system function_response=functions\n{"name": "get_weather", "response": '
            '{"sky": "clear"}}') in prompt
    assert "system function_setting=functions\n" + json.dumps(WEATHER) in prompt
    assert r.usage.completion_tokens == len("It is sunny.")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="debug", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_object"})
    assert e.value.param == "response_format" and e.value.code == "unsupported_value"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="debug", messages=[{"role": "user", "content": "x"}],
                                       temperature=3)
    assert e.value.param == "temperature"


def test_tool_calls_are_parsed_back(setup, scripted):
    client, engine, _ = setup
    scripted(CALL_TEXT)
    ask = dict(model="debug", messages=[{"role": "user", "content": "Weather in Paris?"}],
               tools=[WEATHER], max_tokens=200)
    r = client.chat.completions.create(**ask)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"} and call.id.startswith("call_")
    # streamed: content deltas, then the call as a tool_calls delta
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(**ask, stream=True):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            calls.setdefault(tc.index, [tc.function.name, ""])[1] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert content == "Let me check." and finish == "tool_calls"
    assert calls == {0: ["get_weather", '{"city": "Paris"}']}
    # tool_choice "none": no tools shown, nothing parsed
    r = client.chat.completions.create(**ask, tool_choice="none")
    assert r.choices[0].message.content == CALL_TEXT and r.choices[0].message.tool_calls is None
    assert "function_setting" not in engine.prompts[-1]
    # a named tool_choice writes the call's start into the prompt; the model gives arguments
    scripted('{"city": "Rome"})\n```')
    r = client.chat.completions.create(**ask, tool_choice={"type": "function",
                                                           "function": {"name": "get_weather"}})
    assert engine.prompts[-1].endswith("ai name=assistant\n```typescript\nfunctions.get_weather(")
    (call,) = r.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Rome"}
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    scripted('get_weather({"city": "Oslo"})\n```')
    r = client.chat.completions.create(**ask, tool_choice="required")
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}


def test_usage_counts_returned_tokens(setup, scripted):
    client, *_ = setup
    scripted("hello world, goodbye")
    r = client.completions.create(model="debug", prompt="x", max_tokens=20, stop=["world"])
    assert r.choices[0].text == "hello " and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 6  # "world" is not returned, so not counted
    chunks = list(client.completions.create(model="debug", prompt="x", max_tokens=20,
                                            stop=["world"], stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "hello "
    assert chunks[-1].usage.completion_tokens == 6
    r = client.chat.completions.create(model="debug", messages=[{"role": "user", "content": "x"}],
                                       stop=", g")
    assert r.choices[0].message.content == "hello world" and r.usage.completion_tokens == 11


def test_logprobs_text_offset_continues_across_chunks(setup, scripted):
    client, *_ = setup
    scripted("abc déf")
    text, offsets, tokens = "", [], []
    for c in client.completions.create(model="debug", prompt="x", max_tokens=8, logprobs=1,
                                       stream=True):
        if c.choices and c.choices[0].logprobs:
            offsets += c.choices[0].logprobs.text_offset
            tokens += c.choices[0].logprobs.tokens
        text += c.choices[0].text if c.choices else ""
    assert text == "abc déf"
    # one token per byte: "é" is two tokens, both at its character
    assert offsets == [0, 1, 2, 3, 4, 5, 5, 6]
    r = client.completions.create(model="debug", prompt="x", max_tokens=8, logprobs=1)
    assert r.choices[0].logprobs.text_offset == offsets
    assert len(r.choices[0].logprobs.token_logprobs) == 8
    r = client.completions.create(model="debug", prompt="xy", max_tokens=3, echo=True,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == "xyabc"


def test_errors_reach_the_sdk_as_openai_errors(setup):
    client, *_ = setup
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="debug", prompt="x" * 2100)
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="debug", prompt="x", seed=2 ** 64)
    assert e.value.param == "seed"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
