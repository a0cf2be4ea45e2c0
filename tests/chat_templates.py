"""Chat templates for tests. TEXT01: the MiniMax-Text-01 / VL-01 chat format as
/work/shared/VL01.md section 8 describes it (written here from that description): turns
`<beginning_of_sentence>{header}\n{content}<end_of_sentence>\n`, content a list of typed items,
function results as `system function_response=functions` with a {"name", "response"} body, one
`system function_setting=functions` block per tool after the conversation, the generation prompt
`<beginning_of_sentence>ai name=assistant\n` with transformers' {% generation %} marker."""

TEXT01 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<beginning_of_sentence>system ai_setting=assistant\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<beginning_of_sentence>user name=user\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<beginning_of_sentence>ai name=assistant\\n' }}"
    "{% endif %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{% for item in message['content'] %}"
    "{% if item.type == 'image' %}<image>{% elif item.type == 'text' %}{{ item.text }}{% endif %}"
    "{% endfor %}{{ '<end_of_sentence>\\n' }}{% endif %}"
    "{% if message['role'] == 'function' %}"
    "{{ '<beginning_of_sentence>system function_response=functions\\n' + '{\"name\": \"' "
    "+ message['name'] + '\", \"response\": ' + message['content'][0]['text'] + '}' "
    "+ '<end_of_sentence>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if tools %}{% for function in tools %}"
    "{{ '<beginning_of_sentence>system function_setting=functions\\n' + function | tojson "
    "+ '<end_of_sentence>\\n' }}{% endfor %}{% endif %}"
    "{% if add_generation_prompt %}{{ '<beginning_of_sentence>ai name=assistant\\n' }}"
    "{% generation %}{% endgeneration %}{% endif %}"
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city <now> & later",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
