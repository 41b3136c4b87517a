"""What the daemons built on the client share: binding rules, request and event sockets, a non-blocking manager
dispatcher, logging and start-up. Server-side only; agents on other machines need just ``model_client``."""
