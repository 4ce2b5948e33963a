"""The sandbox's test clock (issue 23 item 8): the offset in the database (store.py), its
routes (routes.py) and CLI (cli.py). The time itself is clock.py's."""
