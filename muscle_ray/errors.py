"""One exception type for problems the user can fix (bad file, bad row, bad config).

The CLI prints these as a single line and exits with code 2, never a traceback.
"""


class MuscleError(Exception):
    """A user-facing error: the message names the file, field and row at fault."""


class BadRow(MuscleError):
    """One input row cannot be used; jobs log it to errors.parquet and go on."""

    def __init__(self, reason: str, row: int | None = None, source: str | None = None):
        self.reason = reason
        self.row = row
        self.source = source
        where = ", ".join(x for x in (source, None if row is None else f"row {row}") if x)
        super().__init__(f"{where}: {reason}" if where else reason)
