"""CheckpointError: one error that names everything wrong with a checkpoint at once."""

from __future__ import annotations

MAX_NAMES_SHOWN = 25


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_NAMES_SHOWN])
    more = len(items) - MAX_NAMES_SHOWN
    return shown + (f", ... and {more} more" if more > 0 else "")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as the model its config describes.

    `missing`, `unexpected` and `mismatched` hold every offending tensor name (the message shows
    the first MAX_NAMES_SHOWN of each kind, so that it stays one readable line)."""

    def __init__(self, message: str, missing: list[str] | None = None,
                 unexpected: list[str] | None = None, mismatched: list[str] | None = None):
        super().__init__(message)
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])
        self.mismatched = list(mismatched or [])

    @classmethod
    def from_problems(cls, where: str, missing: list[str], unexpected: list[str],
                      mismatched: dict[str, str]) -> "CheckpointError":
        """`mismatched`: name -> "what is wrong" (e.g. "shape [4, 8], expected [8, 8])."""
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s): {_names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s): {_names(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} mismatched tensor(s): "
                         + _names([f"{k} ({v})" for k, v in mismatched.items()]))
        return cls(f"{where}: " + "; ".join(parts), missing, unexpected, list(mismatched))
