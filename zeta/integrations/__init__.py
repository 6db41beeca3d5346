"""Adapters that plug zeta into agent frameworks in-process."""
