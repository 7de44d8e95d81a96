"""Two exception types a user meets: `UserError`, a mistake the CLI prints on one line before it
exits 2; and `Rejected`, one input row that cannot be used, which never stops an ingest: it
becomes a row of a rejects table with its reason."""


class UserError(Exception):
    """A bad config key, a missing file, an input that cannot be read: says what is wrong and how to fix it."""


class Rejected(Exception):
    """An input row that cannot be used; `reason` is the rejects table's reason (e.g. corrupt_image)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
