"""Exceptions a user sees at the boundary (besides ConfigError and InputError): wrong stage order, storage."""

from __future__ import annotations


class StageInputError(RuntimeError):
    """A stage was asked to run without what it needs (e.g. split before ingest)."""


class CorruptTableError(StageInputError):
    """A manifest table holds a file that is not readable Parquet (a damaged footer, a foreign file): named, never
    skipped, so a reader never shows a silently shortened table."""


class StorageError(OSError):
    """Writing to the output failed (disk full, read-only, permissions, a vanished mount): not the input's fault.

    A run stops on it (exit 3) with its committed work intact; it never becomes a reject of the video."""

    @classmethod
    def from_message(cls, message: str) -> StorageError:
        """Rebuild one reported across a process boundary as `str(StorageError(errno, strerror, filename))`."""
        import re

        found = re.match(r"\[Errno (\d+)\] (.*?)(?:: '(.*)')?$", message, re.S)
        if not found:
            return cls(message)
        return cls(int(found.group(1)), found.group(2), found.group(3))


class DecoderUnavailable(RuntimeError):
    """The isolated decoding process could not start or died before its first heartbeat: the worker's fault.

    Raised from the stage (never a reject of the video); a run stops on it (exit 6) with its videos unprocessed,
    so a re-run resumes them."""

    MARKER = "the decoding process could not start"  # every message starts with it (Ray retries on it)


class LeaseHeld(RuntimeError):
    """Another writer holds the corpus's writer lease: refused before anything is touched (exit 4)."""


class LeaseLost(RuntimeError):
    """A running writer's lease was taken over (it was judged dead): it stops before writing more (exit 4)."""
