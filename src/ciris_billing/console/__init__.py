"""The operator console at /console: sessions (sessions.py), what its pages show (queries.py),
the actions it takes (actions.py, through the same service functions as the API and CLI, each
with its audit-trail row), and its routes (routes.py)."""
