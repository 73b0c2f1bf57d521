"""User-facing errors.

Every problem a user can cause (a bad parameter, a missing file, a corrupt image)
raises an :class:`LtpipeError` whose message names the problem and the fix. Stage
scripts print such errors without a traceback and exit with status 2.
"""

import functools
import os
import signal
import sys
import threading
import time
from typing import Optional


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


class DiskFullError(LtpipeError):
    """An output cannot be written: its filesystem is full (or over quota)."""


def user_message(exc: BaseException) -> str:
    """The user-facing text of an error, without a DataLoader worker's traceback around it."""
    text = str(exc)
    if "Original Traceback" in text:
        # torch re-raises a worker's exception as `Caught X in DataLoader worker ... Original Traceback ...`,
        # ending with the original `module.X: message` line.
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


# How often a stage looks whether the DVC process that started it is still there, and how long
# it then gives its own clean-up (finally blocks, atomic writers, DataLoader workers) before it
# exits regardless.
DVC_WATCH_INTERVAL_S = 0.5
STOP_GRACE_S = 10.0


def _looks_like_dvc(process) -> bool:
    try:
        return any(os.path.basename(arg) == "dvc" for arg in process.cmdline()[:3])
    except Exception:  # noqa: BLE001 - gone or not ours to read: not evidence of anything
        return False


def dvc_ancestor():
    """The DVC process that runs this stage: ``(process, True)``; ``(None, False)`` when it is
    already gone; ``None`` when no DVC process started this one (run directly, or under pytest).

    DVC sets ``DVC_STAGE`` in the environment of every stage command it starts, and runs it
    through ``$SHELL -c`` (dash stays the parent of Python; ``torchrun`` adds another level).
    Every wrapper in between inherits the variable, so the nearest ancestor whose environment
    lacks it (or holds another value) is the process that set it: ``dvc repro``, ``dvc exp
    run``, or a queue worker's ``dvc exp exec-run``. When that ancestor turns out to be PID 1
    (and not DVC itself, as in a container), the wrappers were re-parented: DVC is already gone.
    """
    marker = os.environ.get("DVC_STAGE")
    if marker is None:
        return None
    import psutil  # a dependency of dvc, so present wherever DVC runs a stage

    try:
        process = psutil.Process().parent()
        while process is not None:
            try:
                started_it = process.environ().get("DVC_STAGE") != marker
            except psutil.AccessDenied:
                started_it = True  # another user's process: not a wrapper of ours
            if started_it:
                if process.pid == 1 and not _looks_like_dvc(process):
                    return None, False
                return process, True
            process = process.parent()
    except psutil.NoSuchProcess:
        return None, False  # a wrapper between DVC and this stage is already gone
    return None


def _is_alive(process) -> bool:
    import psutil

    try:
        # is_running() compares the start time, so a recycled PID does not count; a zombie is dead.
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class DvcWatcher:
    """Stops this stage when the DVC process that started it dies (SIGTERM or SIGKILL to
    ``dvc`` alone): DVC does not pass the signal on, and an orphaned stage would go on writing
    its outputs while the user's re-run removes and rewrites them ("Directory not empty").

    Stopping is what Ctrl-C does: ``KeyboardInterrupt`` in the main thread, so ``finally``
    blocks and atomic writers clean up and DataLoader workers are shut down; a stage that has
    not ended ``STOP_GRACE_S`` later exits at once."""

    # Set before the watcher interrupts the main thread, which may then be anywhere, even still
    # inside start_if_under_dvc: main_guard tells this stop from a user's Ctrl-C by it.
    fired = threading.Event()

    def __init__(self, dvc_process):
        self.dvc_pid = dvc_process.pid
        self._main = threading.main_thread().ident
        self._dvc_process = dvc_process

    @classmethod
    def start_if_under_dvc(cls) -> "Optional[DvcWatcher]":
        """Watch the DVC process that started this stage, if any; when DVC is already gone, stop
        at once (no thread, no signal: nothing has started yet)."""
        found = dvc_ancestor()
        if found is None:
            return None
        process, alive = found
        if not alive:
            _say_stopping(None)
            sys.exit(STOPPED_STATUS)
        watcher = cls(process)
        if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
            # A stage started in the background by a script ignores SIGINT; the watcher stops it with one.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        threading.Thread(target=watcher._watch, name="ltpipe-dvc-watcher", daemon=True).start()
        return watcher

    def _watch(self) -> None:
        while _is_alive(self._dvc_process):
            time.sleep(DVC_WATCH_INTERVAL_S)
        _say_stopping(self.dvc_pid)
        self.fired.set()
        # A signal to the main thread, not _thread.interrupt_main(): it also breaks a blocking wait.
        signal.pthread_kill(self._main, signal.SIGINT)
        time.sleep(STOP_GRACE_S)
        os._exit(STOPPED_STATUS)


ERROR_STATUS = 2
STOPPED_STATUS = 143  # as if the stage itself had received the SIGTERM sent to dvc


def _say_stopping(dvc_pid: Optional[int]) -> None:
    which = f" (pid {dvc_pid})" if dvc_pid else ""
    print(f"ltpipe error: the dvc process that started this stage{which} exited; stopping so a re-run "
          "does not collide with this one.", file=sys.stderr, flush=True)


def main_guard(func):
    """Run a stage entry point; turn :class:`LtpipeError` into a clean exit, and stop the stage
    when the DVC process that started it dies (see :class:`DvcWatcher`)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            DvcWatcher.start_if_under_dvc()
            return func(*args, **kwargs)
        except LtpipeError as exc:
            print(f"ltpipe error: {user_message(exc)}", file=sys.stderr)
            sys.exit(ERROR_STATUS)
        except KeyboardInterrupt:
            if not DvcWatcher.fired.is_set():
                raise
            sys.exit(STOPPED_STATUS)

    return wrapper
