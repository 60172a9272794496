"""The SYN sampler's receive ring: a PACKET_RX_RING mapped into this process, so the samples are
read from memory the kernel shares instead of with a recvmsg(2) each
(Documentation/networking/packet_mmap.rst; the structures are linux/if_packet.h's).

TPACKET_V2, not V3: a V2 frame is the reader's as soon as the kernel has written it (its status
turns TP_STATUS_USER and poll(2) wakes), while V3 hands whole blocks over, each once it is full
or its retire timer fires (packet_mmap.rst, "TPACKET_V2 --> TPACKET_V3": "Read/poll is at a
block-level", "Added poll timeout"). A probe's read() must see what is queued now, so under V3 it
would miss up to a timer's worth of samples, and the block timer keeps firing while the namespace
is idle, when the sampler is to cost nothing. A flood's samples are a few thousand a second, far
from where V3's denser blocks would count.

No fanout (packet_mmap.rst, "AF_PACKET fanout mode"): it spreads packets over several sockets for
several readers; the sampler has one reader, and the filter has already kept 1 in N.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import platform
import socket
import struct
from typing import Final

from synwatch.probes.synfilter import SNAPLEN, Packet, parse_packet

# linux/if_packet.h
SOL_PACKET, PACKET_RX_RING, PACKET_VERSION = 263, 5, 10
TPACKET_V2 = 1
TP_STATUS_KERNEL, TP_STATUS_USER = 0, 1
TPACKET_ALIGNMENT = 16
# struct tpacket2_hdr as far as the sampler reads it: tp_status, tp_len, tp_snaplen, tp_mac,
# tp_net, tp_sec, tp_nsec (then tp_vlan_tci, tp_vlan_tpid, 4 bytes of padding: 32 bytes)
HEADER: Final = struct.Struct("=IIIHHII")
STATUS: Final = struct.Struct("=I")
TPACKET2_HDR_SIZE: Final = 32
SOCKADDR_LL_SIZE: Final = 20  # struct sockaddr_ll
BLOCK_MIN: Final = 1 << 16  # a block of whole pages (packet_mmap.rst, "PACKET_MMAP setting
# constraints"), 64 KiB: each a small allocation of contiguous memory
# About the samples the socket's 4 MiB receive buffer holds without the ring (9,620 here: the
# kernel doubles the size asked for and charges each queued sample ~870 bytes): a flood's first
# burst, kept 1 in 1 until N follows it, fills either, and every sample held is one Python reads
# (16,384 frames, 4 MiB of ring, cost a fifth more CPU over a flood's first seconds here); past
# it the kernel counts drops, which scale the estimate up. 2 MiB of 256-byte frames.
RING_FRAMES: Final = 8192
# The ring is read with plain loads and a plain store: the status first, then the frame, then the
# status given back. x86 keeps loads in order, and stores after the loads before them (Intel SDM
# vol. 3A, 9.2.2 "Memory Ordering in P6 and More Recent Processor Families"); arm64 and others do
# not, and libpcap reads tp_status there with an acquire load and gives it back with a release
# store (pcap-linux.c, packet_mmap_acquire/packet_mmap_release), which Python cannot. Elsewhere
# the sampler reads by recvmsg.
ORDERED_CPU: Final = platform.machine() in {"x86_64", "AMD64", "i386", "i686"}


def tpacket_align(x: int) -> int:
    """TPACKET_ALIGN (linux/if_packet.h)."""
    return (x + TPACKET_ALIGNMENT - 1) & ~(TPACKET_ALIGNMENT - 1)


def frame_size(snaplen: int = SNAPLEN) -> int:
    """A frame that holds ``snaplen`` bytes of a SOCK_DGRAM packet: the kernel writes them at
    TPACKET_ALIGN(TPACKET2_HDRLEN) + 16 (net/packet/af_packet.c, tpacket_rcv: netoff), where
    TPACKET2_HDRLEN is the aligned header and a struct sockaddr_ll. Rounded up to a power of
    two, so that a block holds whole frames with no gap (packet_mmap.rst, "Mapping and use of
    the circular buffer (ring)"): frame i is at i times the frame size."""
    hdrlen = tpacket_align(TPACKET2_HDR_SIZE) + SOCKADDR_LL_SIZE
    need = tpacket_align(tpacket_align(hdrlen) + 16 + snaplen)
    return 1 << (need - 1).bit_length()


class RxRing:
    """A receive ring: take() hands over the frames the kernel has filled, in the order it
    filled them, and gives each back to the kernel once read. One reader at a time (the
    caller's lock): the ring has no lock of its own."""

    def __init__(self, ring: mmap.mmap | bytearray, frame_bytes: int, frames: int) -> None:
        self._ring = ring
        self._view: memoryview | None = memoryview(ring)
        self.frame_bytes, self.frames = frame_bytes, frames
        # the kernel fills the frames in turn from the first, and skips none: the frame it
        # fills next after the last one read is the next in turn (af_packet.c, rx_ring.head)
        self.next = 0

    def take(self, limit: int) -> list[tuple[Packet | None, int]]:
        """Up to ``limit`` filled frames: each packet as parse_packet reads it (None for one it
        does not take) and the kernel's receive time, ns since the epoch (CLOCK_REALTIME)."""
        view = self._view
        if view is None:  # closed
            return []
        samples: list[tuple[Packet | None, int]] = []
        at, size, frames = self.next, self.frame_bytes, self.frames
        while len(samples) < limit:
            base = at * size
            # the status first (the header is unpacked in order): the kernel sets it last, after
            # a write barrier (af_packet.c, tpacket_rcv), and the CPU keeps loads in order
            # (ORDERED_CPU)
            status, _len, snaplen, _mac, net, sec, nsec = HEADER.unpack_from(view, base)
            if not status & TP_STATUS_USER:
                break
            start = base + net
            # the packet read in place (sliced, not copied), then its frame given back
            packet = parse_packet(view[start:min(start + snaplen, base + size)])
            samples.append((packet, sec * 1_000_000_000 + nsec))
            STATUS.pack_into(view, base, TP_STATUS_KERNEL)
            at = at + 1 if at + 1 < frames else 0
        self.next = at
        return samples

    def close(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
            if isinstance(self._ring, mmap.mmap):
                self._ring.close()


def map_ring(sock: socket.socket, frames: int = RING_FRAMES, snaplen: int = SNAPLEN) -> RxRing:
    """The socket's receive ring of at least ``frames`` frames, set up and mapped; OSError
    when the kernel refuses (one without it, no memory for the ring), the socket then as it
    was: its packets queued."""
    if not ORDERED_CPU:
        raise OSError(errno.EOPNOTSUPP, f"read in place on x86 only, not {platform.machine()}")
    frame = frame_size(snaplen)
    block = max(mmap.PAGESIZE, BLOCK_MIN, frame)  # whole pages: all three powers of two
    blocks = -(-frames // (block // frame))
    frames = blocks * (block // frame)
    sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
    # struct tpacket_req: block size, number of blocks, frame size, number of frames
    sock.setsockopt(SOL_PACKET, PACKET_RX_RING, struct.pack("=IIII", block, blocks, frame, frames))
    try:
        ring = mmap.mmap(sock.fileno(), block * blocks, mmap.MAP_SHARED,
                         mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        with contextlib.suppress(OSError):  # a ring of no blocks: the ring freed (af_packet.c,
            # packet_set_ring), packets queued to the socket again
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, bytes(16))
        raise
    return RxRing(ring, frame, frames)
