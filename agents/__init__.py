"""Persona agents: each answers, with its own model, voice and prompt, what the routing sends it
(``python -m agents --persona jarvis``)."""
