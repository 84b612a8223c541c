"""The server's routes, one module per surface: native (`/generate`, `/health`), OpenAI-compatible
(`/v1/models`, `/v1/completions`, `/v1/chat/completions`), codes (`/v1/codes/*`), web (`/`) and
metrics (`/metrics`)."""
