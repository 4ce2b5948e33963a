"""The measured fast path for credit checks and charges: ASGI entry, lanes, pool, reader, writer."""
