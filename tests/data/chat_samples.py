"""A tool, a tool call and its response in Gemma 4's chat format, shared by the chat-format tests.

Written out by hand: WEATHER_DECLARED, CALLED and RESPONDED are what Gemma 4's chat template writes
for WEATHER, CALL and TOOL.
"""
Q = '<|"|>'  # Gemma 4's string delimiter
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "A city."},
        "unit": {"type": "string", "enum": ["C", "F"]}},
        "required": ["city"]}}}
WEATHER_DECLARED = (f"<|tool>declaration:get_weather{{description:{Q}Current weather.{Q},parameters:{{properties:{{"
                    f"city:{{description:{Q}A city.{Q},type:{Q}STRING{Q}}},unit:{{enum:[{Q}C{Q},{Q}F{Q}],"
                    f"type:{Q}STRING{Q}}}}},required:[{Q}city{Q}],type:{Q}OBJECT{Q}}}}}<tool|>")
USER = {"role": "user", "content": "Weather in Paris?"}
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
TOOL = {"role": "tool", "tool_call_id": "c1", "content": "18 C"}
CALLED = f"<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>"
RESPONDED = f"<|tool_response>response:get_weather{{value:{Q}18 C{Q}}}<tool_response|>"
