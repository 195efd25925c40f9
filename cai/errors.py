"""One exception type for every problem a user can fix.

The CLI prints a `CaiError` as one line (no traceback); anything else is a bug in cai and
keeps its traceback. Messages name the file and, where there is one, the field.
"""


class CaiError(Exception):
    """A user-fixable problem: bad input, a missing model, a refused setting."""

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.source = source
        self.field = field
        parts = [p for p in (source, field and f"field '{field}'") if p]
        super().__init__(f"{': '.join(parts)}: {message}" if parts else message)
