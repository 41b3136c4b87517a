"""Home Assistant's voice over the Wyoming protocol: Whisper, Piper and the personas of the manager."""
