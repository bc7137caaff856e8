"""Interact Relay: forwards webhook and SQS events to Adobe Edge Network `interact` and keeps the answers."""
