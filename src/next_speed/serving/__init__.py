"""Steps 08 and 09: the chat REPL, and the HTTP server (native, OpenAI-compatible, codes, web and
metrics routers) with its continuous-batching scheduler."""
