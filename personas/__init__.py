"""The persona core, below every daemon that speaks: persona configuration and routing (``config``), each
session's history (``history``), what a turn asks of a model (``answer``), speakable pieces (``pieces``), the
transport-free turn (``turn``), and the speech services' contract the voice loop runs on (``speech_services``).
The persona agents, the Wyoming service and the gateway's voice faces all answer through it."""
