"""Wire constants of QEMU migration, each with the QEMU name it mirrors.

Values are facts of QEMU's protocol (see the project spec, sections 2, 3, 7); every
multi-byte integer on the wire is big-endian.
"""

from __future__ import annotations

from typing import Final

# --- pages -------------------------------------------------------------------------------
PAGE_SIZE: Final = 4096  # TARGET_PAGE_SIZE on x86_64
PAGE_SHIFT: Final = 12
MULTIFD_PACKET_SIZE: Final = 512 * 1024  # MULTIFD_PACKET_SIZE
PAGES_PER_PACKET: Final = MULTIFD_PACKET_SIZE // PAGE_SIZE  # multifd_ram_page_count() == 128

# --- multifd channels --------------------------------------------------------------------
MULTIFD_MAGIC: Final = 0x11223344  # MULTIFD_MAGIC
MULTIFD_VERSION: Final = 1  # MULTIFD_VERSION
INIT_PACKET_SIZE: Final = 64  # sizeof(MultiFDInit_t)
PACKET_FIXED_SIZE: Final = 320  # sizeof(MultiFDPacket_t) without offset[]
PACKET_HEADER_SIZE: Final = PACKET_FIXED_SIZE + 8 * PAGES_PER_PACKET  # 1344
RAMBLOCK_NAME_SIZE: Final = 256  # char ramblock[256]
UUID_SIZE: Final = 16

MULTIFD_FLAG_SYNC: Final = 0x01  # MULTIFD_FLAG_SYNC
MULTIFD_FLAG_COMPRESSION_MASK: Final = 0x3E  # MULTIFD_FLAG_COMPRESSION_MASK (9.1+)
MULTIFD_FLAG_NOCOMP: Final = 0x00  # MULTIFD_FLAG_NOCOMP
MULTIFD_FLAG_ZLIB: Final = 0x02  # MULTIFD_FLAG_ZLIB
MULTIFD_FLAG_ZSTD: Final = 0x04  # MULTIFD_FLAG_ZSTD
MULTIFD_FLAG_QPL: Final = 0x08  # MULTIFD_FLAG_QPL
MULTIFD_FLAG_UADK: Final = 0x10  # MULTIFD_FLAG_UADK
MULTIFD_FLAG_QATZIP: Final = 0x20  # MULTIFD_FLAG_QATZIP
MULTIFD_FLAG_DEVICE_STATE: Final = 0x40  # MULTIFD_FLAG_DEVICE_STATE (10.0+)

# QEMU's receive buffer for compressed payloads is 2 * MULTIFD_PACKET_SIZE and it does not
# check next_packet_size against it; we never send more and never accept more.
MAX_COMPRESSED_PAYLOAD: Final = 2 * MULTIFD_PACKET_SIZE

# --- main migration stream ---------------------------------------------------------------
QEMU_VM_FILE_MAGIC: Final = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION: Final = 3  # QEMU_VM_FILE_VERSION

QEMU_VM_EOF: Final = 0x00
QEMU_VM_SECTION_START: Final = 0x01
QEMU_VM_SECTION_PART: Final = 0x02
QEMU_VM_SECTION_END: Final = 0x03
QEMU_VM_SECTION_FULL: Final = 0x04
QEMU_VM_SUBSECTION: Final = 0x05
QEMU_VM_VMDESCRIPTION: Final = 0x06
QEMU_VM_CONFIGURATION: Final = 0x07
QEMU_VM_COMMAND: Final = 0x08
QEMU_VM_SECTION_FOOTER: Final = 0x7E

MIG_CMD_SWITCHOVER_START: Final = 0x000B  # MIG_CMD_SWITCHOVER_START (10.0+)

# RAM_SAVE_FLAG_* (migration/ram.c): low bits of the be64 address word of each ram record.
RAM_SAVE_FLAG_FULL: Final = 0x01  # obsolete, rejected
RAM_SAVE_FLAG_ZERO: Final = 0x02
RAM_SAVE_FLAG_MEM_SIZE: Final = 0x04
RAM_SAVE_FLAG_PAGE: Final = 0x08
RAM_SAVE_FLAG_EOS: Final = 0x10
RAM_SAVE_FLAG_CONTINUE: Final = 0x20
RAM_SAVE_FLAG_XBZRLE: Final = 0x40
RAM_SAVE_FLAG_HOOK: Final = 0x80
RAM_SAVE_FLAG_COMPRESS_PAGE: Final = 0x100
RAM_SAVE_FLAG_MULTIFD_FLUSH: Final = 0x200
RAM_FLAGS_MASK: Final = PAGE_SIZE - 1

# Section versions QEMU registers for the sections a ``-M none`` machine sends.
RAM_SECTION_VERSION: Final = 4  # register_savevm_live("ram", 0, 4, ...)
TIMER_SECTION_VERSION: Final = 2  # vmstate_timers .version_id
GLOBALSTATE_SECTION_VERSION: Final = 1  # vmstate_globalstate .version_id
GLOBALSTATE_RUNSTATE_SIZE: Final = 100  # GlobalState.runstate[100]
TIMER_STATE_SIZE: Final = 24  # cpu_ticks_offset, unused dummy, cpu_clock_offset
