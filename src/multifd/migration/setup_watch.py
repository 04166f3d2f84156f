"""Why a destination's setup will not finish: the checks run while it waits for channels.

QEMU negotiates no channel count and no multifd capability, so a destination configured
for N channels may face a source that opens fewer, or none. Waiting for them until the
setup timeout (60 s by default) tells the user nothing for a minute; :class:`SetupWatch`
fails the setup as soon as the channels still missing cannot come, with the reason:

- the channels that did arrive all wait at a SYNC, and the rest still has not come
  :data:`STRAGGLER_GRACE` seconds later: a source opens its channels together;
- no channel came within :data:`STRAGGLER_GRACE` seconds of the end of the source's RAM
  setup on the main channel (seen by :class:`~multifd.migration.arrivals.Arrivals`): a
  source with multifd on has connected every channel by then;
- the setup timeout passed.
"""

from __future__ import annotations

import time
from typing import Final

from multifd.engine.recv import Receiver
from multifd.errors import MAIN, ChannelError, ChannelRefused
from multifd.migration.arrivals import Arrivals

# Once the multifd channels that arrived all wait at a SYNC, those still missing get this
# long before the setup fails (rather than after the whole setup timeout): a source opens
# its channels together, so by then a channel still missing is one it does not have, or one
# whose connection was retried (the kernel's first SYN retry comes after 1 s, the next 2 s
# later). The same grace follows the end of the source's RAM setup.
STRAGGLER_GRACE: Final = 5.0


class SetupWatch:
    """The checks of one destination's setup; owned by its setup thread.

    Args:
        channels: the multifd channels the destination expects.
        setup_timeout: seconds for every channel to arrive.
        refused: the connections refused so far (the timeout's message names the last).
    """

    def __init__(self, channels: int, setup_timeout: float, refused: list[ChannelRefused]) -> None:
        self.channels = channels
        self.setup_timeout = setup_timeout
        self._refused = refused
        self._deadline = time.monotonic() + setup_timeout
        self._stalled_since: float | None = None  # when the channels that arrived all parked

    def remaining(self) -> float:
        """Seconds left before the setup timeout."""
        return self._deadline - time.monotonic()

    def check(self, arrivals: Arrivals, receiver: Receiver | None) -> None:
        """Raise :class:`ChannelError` if the channels still missing will not come."""
        if self.remaining() <= 0:
            self._timed_out(arrivals)
        self._check_stragglers(receiver)
        self._check_ram_setup(arrivals)

    def _check_stragglers(self, receiver: Receiver | None) -> None:
        missing = receiver.stalled_short() if receiver is not None else None
        if missing is None:
            self._stalled_since = None
            return
        now = time.monotonic()
        if self._stalled_since is None:
            self._stalled_since = now
        if now - self._stalled_since < STRAGGLER_GRACE:
            return
        arrived = self.channels - len(missing)
        raise ChannelError(
            f"{arrived} of {self.channels} multifd channels arrived and have waited at a sync "
            f"point for {STRAGGLER_GRACE:g} s without {', '.join(missing)}: does the source "
            f"use multifd with {self.channels} channels?",
            channel=missing[0],
        )

    def _check_ram_setup(self, arrivals: Arrivals) -> None:
        # Some channels that came and others missing are _check_stragglers' to name.
        ended = arrivals.ram_setup_ended
        if arrivals.multifd or ended is None or time.monotonic() - ended < STRAGGLER_GRACE:
            return
        raise ChannelError(
            f"the source ended its RAM setup {STRAGGLER_GRACE:g} s ago and none of the "
            f"{self.channels} multifd channels has arrived: is multifd off at the source?",
            channel=MAIN,
        )

    def _timed_out(self, arrivals: Arrivals) -> None:
        refused = ""
        if self._refused:
            last = self._refused[-1]
            refused = f"; {len(self._refused)} connection(s) refused, the last: {last}"
        if arrivals.main is None:
            raise ChannelError(
                f"no main channel within {self.setup_timeout:g} s{refused}", channel=MAIN
            )
        raise ChannelError(
            f"{arrivals.multifd} of {self.channels} multifd channels arrived within "
            f"{self.setup_timeout:g} s; does the source use multifd with "
            f"{self.channels} channels?{refused}",
            channel="multifd",
        )
