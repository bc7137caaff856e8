"""Local development tooling: Edge simulator, local AWS stack, gateway and poller. Never deployed."""
