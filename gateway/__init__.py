"""The HTTP gateway: OpenAI- and Ollama-compatible endpoints in front of the model manager, a thin client of it
that never loads a model itself."""
