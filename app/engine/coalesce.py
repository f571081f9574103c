"""Chunk coalescing: the first batch goes out at once (whatever is ready, no waiting); later
batches gather items over a short window so one Ray object carries many tokens (Ray moves
~1,500 objects/s on 2 cores)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


async def coalesce(
    source: AsyncIterator[T], *, window_s: float, max_items: int
) -> AsyncGenerator[list[T], None]:
    """Yield lists of items from `source`.

    A pump task reads `source` into a queue so that waiting for the window never cancels a
    pending read. Closing this generator (client gone) cancels the pump, which closes `source`,
    which lets the engine adapter abort its request. Exceptions of `source` are re-raised here
    after the items that came before them have been delivered.
    """
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
            queue.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait(error)
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()

    task = asyncio.get_running_loop().create_task(pump())
    first = True
    try:
        while True:
            item = await queue.get()
            batch: list[T] = []
            if _is_terminal(item):
                _finish(item)
                return
            batch.append(item)  # type: ignore[arg-type]
            if not first and window_s > 0:
                deadline = asyncio.get_running_loop().time() + window_s
                while len(batch) < max_items:
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(queue.get(), remaining)
                    except TimeoutError:
                        break
                    if _is_terminal(item):
                        yield batch
                        _finish(item)
                        return
                    batch.append(item)  # type: ignore[arg-type]
            else:
                while len(batch) < max_items and not queue.empty():
                    item = queue.get_nowait()
                    if _is_terminal(item):
                        yield batch
                        _finish(item)
                        return
                    batch.append(item)  # type: ignore[arg-type]
            first = False
            yield batch
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _is_terminal(item: object) -> bool:
    return item is _END or isinstance(item, BaseException)


def _finish(item: object) -> None:
    if isinstance(item, BaseException):
        raise item
