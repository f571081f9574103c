"""Teardowns that only wait, run beside the tests after them. Stopping a Ray head of a test's
own (`scripts/stack.py stop`, then its leftover processes) takes 15 to 35 s, nearly all of it
waiting for processes to exit; nothing after it needs that head gone. `start` runs one in a
thread; `finish` (the session fixture `teardowns`, before the session stack stops) waits for
all of them and fails with the first one that failed, named, so every check still runs and
still fails the session."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Teardowns:
    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []
        self._failures: list[tuple[str, BaseException]] = []

    def start(self, name: str, teardown: Callable[[], None]) -> None:
        def run() -> None:
            try:
                teardown()
            except BaseException as error:  # reported by `finish`
                self._failures.append((name, error))

        # not a daemon: an interrupted session still waits for it at exit
        thread = threading.Thread(target=run, name=f"teardown: {name}")
        thread.start()
        self._threads.append(thread)

    def finish(self) -> None:
        for thread in self._threads:
            thread.join()
        if self._failures:
            name, error = self._failures[0]
            others = [other for other, _ in self._failures[1:]]
            raise AssertionError(
                f"the teardown of {name} failed: {error!r}"
                + (f" (and of {', '.join(others)})" if others else "")
            ) from error
