"""The `glmstack` command: main (the parser and chat/models/inspect/convert), serve (builds the engine and the
HTTP app), keys (API keys and usage)."""
