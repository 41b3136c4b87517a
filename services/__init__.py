"""Thin daemons around the manager: they move audio and text and never load a model (the guardrail test checks)."""
