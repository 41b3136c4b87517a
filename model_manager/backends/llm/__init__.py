"""The GGUF LLM engine, in layers that depend one way: ``backend`` (requests, results, streamed text) over
``conversations`` (whose cells sit on which sequence, saved and restored) over ``engine`` (sequences and steps),
which asks ``planner`` what a step carries (pure) and ``executor`` to run it on llama.cpp. ``prompt`` and ``text``
turn requests into tokens and tokens into text."""
