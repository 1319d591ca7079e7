"""Injected disk faults for the write-path tests: a disk that fills up or is slow
(by replacing the file object the atomic writer opens), and a writer process that is
SIGKILLed part-way through a write (watched from outside, by the temp file's size)."""

from __future__ import annotations

import errno
import io
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest


class DiskFault:
    """Counts the bytes offered to the replaced files; ``written`` is their total."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, full_after: int | None = None,
                 delay: float = 0.0) -> None:
        self.written = 0
        fault = self
        real = os.fdopen

        class FaultyFile(io.FileIO):
            def write(self, data: Any) -> int:
                fault.written += len(data)
                time.sleep(delay)
                if full_after is not None and self.tell() + len(data) > full_after:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return super().write(data)

        def fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if "w" in mode:  # the temp file of the atomic writer
                return FaultyFile(fd, "w", closefd=True)
            return real(fd, mode, *args, **kwargs)

        monkeypatch.setattr(os, "fdopen", fdopen)


def full_disk(monkeypatch: pytest.MonkeyPatch, after: int = 4096) -> DiskFault:
    """A disk that is full once a file holds ``after`` bytes (0: at the first write)."""
    return DiskFault(monkeypatch, full_after=after)


def slow_disk(monkeypatch: pytest.MonkeyPatch, delay: float = 0.05) -> DiskFault:
    """A disk whose every write takes ``delay`` seconds (so a save is surely running)."""
    return DiskFault(monkeypatch, delay=delay)


def killed_mid_write_script(directory: Path, saves: str, kill_above: int = 8_000_000) -> str:
    """A Python program that runs ``saves`` (statements, with ``torch`` and ``vgs_ckpt``
    imported) and SIGKILLs itself once a temp file in ``directory`` holds more than
    ``kill_above`` bytes; it exits with 3 if it was never killed."""
    return textwrap.dedent(f"""
        import os, signal, sys, threading, time, torch, vgs_ckpt
        directory = {str(directory)!r}
        def watch():  # kill the process once a temp file is part-written
            while True:
                for name in os.listdir(directory):
                    if name.endswith(".tmp"):
                        try:
                            if os.path.getsize(os.path.join(directory, name)) > {kill_above}:
                                os.kill(os.getpid(), signal.SIGKILL)
                        except FileNotFoundError:
                            pass
                time.sleep(0.0005)
        threading.Thread(target=watch, daemon=True).start()
    """) + textwrap.dedent(saves) + "\nsys.exit(3)\n"
