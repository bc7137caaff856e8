"""Adapters to AWS and Adobe. The only modules that do I/O."""
