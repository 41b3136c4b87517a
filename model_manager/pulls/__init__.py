"""Models fetched by reference (``mm pull``, Ollama's ``/api/pull``): parsing references (``refs``), where their
files are and what they hash to (``remote``, through ``huggingface_hub``), the download (``download``), the pull as a
process of its own (``__main__``) and the manager's side of it (``tracker``)."""
