"""User-facing errors.

Every problem a user can cause (a bad parameter, a missing file, a corrupt image)
raises an :class:`LtpipeError` whose message names the problem and the fix. Stage
scripts print such errors without a traceback and exit with status 2.
"""

import functools
import sys


class LtpipeError(Exception):
    """A problem with the user's input that the user can fix."""


class ConfigError(LtpipeError):
    """A parameter in params.yaml is missing, mistyped or out of range."""


class DataError(LtpipeError):
    """A dataset file or image is missing, unreadable or inconsistent."""


class WeightsError(LtpipeError):
    """Model weights cannot be found or loaded."""


class TrainingError(LtpipeError):
    """Training cannot go on (the loss diverged)."""


def user_message(exc: BaseException) -> str:
    """The user-facing text of an error, without a DataLoader worker's traceback around it."""
    text = str(exc)
    if "Original Traceback" in text:
        # torch re-raises a worker's exception as `Caught X in DataLoader worker ... Original Traceback ...`,
        # ending with the original `module.X: message` line.
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def main_guard(func):
    """Run a stage entry point; turn :class:`LtpipeError` into a clean exit."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except LtpipeError as exc:
            print(f"ltpipe error: {user_message(exc)}", file=sys.stderr)
            sys.exit(2)

    return wrapper
