"""Direct QEMU -> QEMU migrations of the real guest: the baseline the relay is held to.

Each case boots the guest on a source, waits for its first checksum line (so both the
heartbeat and the checksum of the source side are seen working), migrates it into a
destination started with ``-incoming defer`` and checks with :func:`check_migration`
that it resumed exactly where it stopped. The pause and QEMU's downtime are recorded as
``record_property`` entries (``pause_ms``, ``downtime_ms``, ...) in the JUnit report.

The mismatch case shows the wall a relay removes: QEMU does not negotiate multifd
settings, so a destination configured with other channel counts and compression than
its source never completes the migration.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.interop.qemu import QemuError
from tests.vm.conftest import MakeGuest
from tests.vm.guest import (
    BOOT_TIMEOUT,
    Guest,
    Settings,
    check_migration,
    migrate,
    start_migration,
)

pytestmark = [pytest.mark.interop, pytest.mark.vm]

# A direct migration of this guest completes in under a second (0.1-0.7 s seen); a
# mismatched one gets this long to show that it does not.
MISMATCH_WINDOW = 10.0
CANCEL_TIMEOUT = 10.0

RecordProperty = Callable[[str, object], None]


def _boot(make_guest: MakeGuest, binary: str) -> tuple[Guest, Guest, float]:
    """Source and destination; the source has booted and printed a checksum line."""
    src = make_guest(binary, name="src")
    dst = make_guest(binary, name="dst", incoming=True)
    first = src.wait_until_booted()
    assert src.started_at is not None
    return src, dst, first.at - src.started_at


def _direct(make_guest: MakeGuest, binary: str, record_property: RecordProperty) -> None:
    src, dst, boot = _boot(make_guest, binary)
    migration = migrate(src, dst, Settings(channels=2))
    report = check_migration(src, dst)
    for key, value in {
        "boot_s": round(boot, 3),
        "migration_s": round(migration.elapsed, 3),
        "pause_ms": round(report.pause * 1e3),
        "beat_period_ms": round(report.beat_period * 1e3),
        "downtime_ms": report.downtime_ms,
        "total_time_ms": report.total_time_ms,
    }.items():
        record_property(key, value)
    took = f"booted in {boot:.2f} s, migrated in {migration.elapsed:.2f} s"
    print(f"\n{binary}: {took}; {report.summary()}")
    # The guest is paused for QEMU's downtime at least, and beats between the two.
    assert report.pause * 1e3 >= report.downtime_ms


def test_qemu72_to_qemu72_multifd(
    make_guest: MakeGuest, qemu_binary: str, record_property: RecordProperty
) -> None:
    _direct(make_guest, qemu_binary, record_property)


def test_qemu10_to_qemu10_multifd(
    make_guest: MakeGuest, qemu10_binary: str, record_property: RecordProperty
) -> None:
    _direct(make_guest, qemu10_binary, record_property)


def test_mismatched_multifd_settings_never_complete(
    make_guest: MakeGuest, qemu_binary: str
) -> None:
    src, dst, _ = _boot(make_guest, qemu_binary)
    start_migration(src, dst, Settings(channels=2), Settings(channels=4, compression="zstd"))
    try:
        status = src.wait_for_status({"completed", "failed"}, MISMATCH_WINDOW).status
    except QemuError:
        status = str(src.query_migrate().get("status"))  # Still going: it hangs.
    assert status != "completed"
    assert not dst.console.transcript().beats, "the destination resumed the guest"
    if dst.returncode is None:
        assert dst.run_state() == "inmigrate"
    if status != "failed":
        src.execute("migrate_cancel")
        # QEMU 7.2 cancels by waiting for its multifd threads, which stay blocked in
        # writes while the destination holds their sockets open: it cancels once the
        # destination is gone.
        dst.close()
        src.wait_for_status("cancelled", CANCEL_TIMEOUT)
    # The source VM runs on after the failed or cancelled migration.
    assert src.run_state() == "running"
    last = src.console.transcript().beats[-1].n
    src.wait_for_beat(last, BOOT_TIMEOUT)
    src.close()
    dst.close()
    assert src.returncode is not None
    assert dst.returncode is not None
