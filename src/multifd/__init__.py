"""multifd: live memory migration for Python, wire-compatible with QEMU's multifd."""
