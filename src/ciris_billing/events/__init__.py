"""Events out: the transactional outbox (outbox.py) and its delivery to webhook endpoints."""
