"""Auto top-up: a card saved on the payment page pays one pack when the balance runs low.

cards.py: the account's provider customer, the card a payment saved, switching on and off,
removing the card. topups.py: one top-up per balance.low crossing, at most one in flight, the
monthly cap, switched off after repeated failures; outcomes.py: its outcome as the provider
(or the webhook path) reports it.
"""
