"""Steps 08 and 09: the chat REPL, the HTTP server (native, OpenAI-compatible, codes, web, metrics) and its scheduler."""
