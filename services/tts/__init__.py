"""Text to speech: ``tts.say`` in, ``tts.audio`` out (``python -m services.tts``)."""
