"""Chat templates for tests. TEXT01: the MiniMax-Text-01 / VL-01 chat format as
/work/shared/VL01.md section 8 describes it (written here from that description): turns
`<beginning_of_sentence>{header}\n{content}<end_of_sentence>\n`, content a list of typed items,
function results as `system function_response=functions` with a {"name", "response"} body, one
`system function_setting=functions` block per tool after the conversation, the generation prompt
`<beginning_of_sentence>ai name=assistant\n` with transformers' {% generation %} marker."""

from minimax01.infer.chat import TEXT01_TEMPLATE as TEXT01

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city <now> & later",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
