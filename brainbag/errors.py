"""One domain error type for brainbag, with a distinct exit code per family.

Library code raises a subclass of :class:`BrainbagError` whose message names the file, what was
found, what was expected and the fix. The CLI turns it into one red line and ``exit_code``.
"""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class BrainbagError(Exception):
    """Base class of every error brainbag reports to a user."""

    exit_code: int = EXIT_FAILURE


class UsageError(BrainbagError):
    """Options that cannot work together, or a value outside what an option accepts."""

    exit_code = EXIT_USAGE


class InputError(BrainbagError):
    """An input file that is missing, unreadable or unsuitable."""


class WeightsError(BrainbagError):
    """A weights file that is missing, not verifiable or not a brainbag weights file."""


class ProcessingError(BrainbagError):
    """A failure while processing a valid input (for example non-finite network output)."""


class OutputError(BrainbagError):
    """An output that cannot be written (permissions, a read-only or full file system)."""


class FolderInUse(UsageError):
    """Another live brainbag run is writing into this output folder."""


class ManifestError(WeightsError):
    """A weights manifest that is unreadable or breaks the manifest schema."""


def one_line(text: str) -> str:
    """``text`` on one line: messages of other libraries (nibabel's among them) may hold line
    breaks, and brainbag's errors are one line."""
    return re.sub(r"\s*\n\s*", " ", text.strip())
