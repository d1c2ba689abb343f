"""`python -m tests.slow_callbacks`: replserver with asyncio's slow-callback report on.

The event loop runs in debug mode with `slow_callback_duration` from
REPL_TEST_SLOW_CALLBACK_S; asyncio logs every callback that held the loop longer as a
WARNING ("Executing <...> took N seconds"), which lands in the server's log.
"""

from __future__ import annotations

import asyncio
import os
import runpy

SLOW_CALLBACK_ENV = "REPL_TEST_SLOW_CALLBACK_S"


class SlowCallbackPolicy(asyncio.DefaultEventLoopPolicy):
    """Every new loop in debug mode, reporting callbacks slower than the threshold."""

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        loop.set_debug(True)
        loop.slow_callback_duration = float(os.environ[SLOW_CALLBACK_ENV])
        return loop


if __name__ == "__main__":
    asyncio.set_event_loop_policy(SlowCallbackPolicy())
    runpy.run_module("replserver", run_name="__main__", alter_sys=True)
