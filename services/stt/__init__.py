"""Speech to text: producers' audio in, ``stt.transcript`` events out (``python -m services.stt``)."""
