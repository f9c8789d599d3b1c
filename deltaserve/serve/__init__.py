"""OpenAI-compatible serving (`deltaserve serve`) and the terminal chat (`deltaserve chat`).

api_server.py (routes, uvicorn) -> serving_chat.py / serving_completion.py (request -> engine -> response) ->
async_engine.py (the engine thread). protocol.py: request schemas and errors; reasoning.py / tool_parser.py:
streamed output parsing; metrics.py: Prometheus; chat_cli.py: the terminal chat; testing.py: a TEST-ONLY hook.
"""
