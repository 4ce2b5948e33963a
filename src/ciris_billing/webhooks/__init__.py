"""Webhooks: verify the signature, store the event, handle it exactly once."""
