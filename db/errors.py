"""The store's one error type."""


class StoreError(Exception):
    """The store cannot do what was asked; the message is one line for the user."""
