#!/usr/bin/env python3
"""Pack a directory tree into a gzipped ``newc`` cpio archive (a Linux initramfs).

Usage: initramfs.py SOURCE_DIR OUTPUT [--char-dev PATH:MAJOR:MINOR ...]

Needs no ``cpio`` binary and no root: device nodes the kernel wants before ``/dev`` is
mounted (``dev/console``, so that ``/init`` has a console to write to) are described on
the command line instead of being ``mknod``-ed. The output is deterministic: entries in
sorted order, owner root, every timestamp zero (the gzip header's too), inode numbers
counted from 1, so the same tree gives the same bytes.

The newc format (the kernel's ``Documentation/driver-api/early-userspace/buffer-format``):
each entry is the magic ``070701``, thirteen 8-digit hex fields, the NUL-terminated name
padded to a multiple of 4 bytes together with the 110-byte header, then the data padded
to a multiple of 4; the archive ends with an entry named ``TRAILER!!!``.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


class Entry(NamedTuple):
    """One archive member: its name inside the archive, mode bits, data, device numbers."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def write_entry(out: io.BufferedIOBase, entry: Entry, ino: int) -> None:
    """Write one newc entry (header, padded name, padded data) to ``out``."""
    name = entry.name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0, *entry.rdev, len(name), 0)
    header = MAGIC + b"".join(b"%08X" % field for field in fields)
    out.write(header + name + _pad(len(header) + len(name)))
    out.write(entry.data + _pad(len(entry.data)))


def tree_entries(root: Path) -> Iterator[Entry]:
    """The entries of the tree under ``root``, parents before children, names sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        for name in sorted([*dirnames, *filenames]):
            path = here / name
            info = path.lstat()
            member = path.relative_to(root).as_posix()
            permissions = stat.S_IMODE(info.st_mode)
            if stat.S_ISLNK(info.st_mode):
                yield Entry(member, stat.S_IFLNK | 0o777, os.readlink(path).encode())
            elif stat.S_ISDIR(info.st_mode):
                yield Entry(member, stat.S_IFDIR | permissions)
            elif stat.S_ISREG(info.st_mode):
                yield Entry(member, stat.S_IFREG | permissions, path.read_bytes())
            else:
                raise ValueError(f"{path}: only files, directories and symlinks are packed")


def char_device(spec: str) -> Entry:
    """``dev/console:5:1`` -> a character device entry (mode 0600)."""
    path, major, minor = spec.rsplit(":", 2)
    return Entry(path.strip("/"), stat.S_IFCHR | 0o600, rdev=(int(major), int(minor)))


def pack(root: Path, output: Path, devices: list[Entry]) -> None:
    """Write the tree under ``root`` plus ``devices`` to ``output`` as a gzipped newc archive."""
    entries = sorted([*tree_entries(root), *devices], key=lambda entry: entry.name.split("/"))
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise ValueError("a device node clashes with a file of the tree")
    partial = output.with_name(output.name + ".partial")
    with partial.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
        for ino, entry in enumerate(entries, start=1):
            write_entry(out, entry, ino)
        write_entry(out, Entry(TRAILER, 0), 0)
    partial.replace(output)


def main(argv: list[str]) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--char-dev", action="append", default=[], metavar="PATH:MAJOR:MINOR")
    args = parser.parse_args(argv)
    pack(args.source, args.output, [char_device(spec) for spec in args.char_dev])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
