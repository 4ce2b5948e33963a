"""Payments: purchases of uses through a provider-agnostic PaymentProvider."""
