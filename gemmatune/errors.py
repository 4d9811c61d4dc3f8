"""The errors gemmatune raises for a user's mistake: each message says what is wrong and what to do.

They share one base class so that the command line prints them as one line instead of a
traceback (a traceback is for gemmatune's bugs, not for a typo in a path). Each also derives
from the built-in error a caller would expect (ValueError, OSError...), so existing
`except ValueError:` code keeps working.
"""


class GemmatuneError(Exception):
    """A problem with what the user passed or has on disk, with a message that says what to do."""


class DatasetFormatError(GemmatuneError, ValueError):
    """A row that cannot become a conversation; the message names the row, the problem and a fix.
    `reason` is a short category ("not valid JSON", "unknown role"...) for skip counts."""

    def __init__(self, message: str, reason: str = "bad row"):
        super().__init__(message)
        self.reason = reason


class DatasetDownloadError(GemmatuneError, RuntimeError):
    """A hub dataset could not be loaded (usually: no network)."""


class ModelLoadError(GemmatuneError, OSError):
    """A model id or folder that cannot be loaded."""


class MissingTowerError(GemmatuneError, ValueError):
    """Images or audio for a model loaded without the tower that reads them: refused, never ignored."""


class TrainingSetupError(GemmatuneError, ValueError):
    """Settings or data that would make `train` fail or do nothing, found before the first step."""


class CheckpointError(GemmatuneError, ValueError):
    """A saved adapter or checkpoint that is missing, incomplete, corrupt or unsafe to read."""
