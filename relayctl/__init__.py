"""relayctl: operator commands for Interact Relay (show, list rejected, replay, redrive the dead-letter queue)."""
