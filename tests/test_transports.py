"""Host-side pieces of the transports that need no GPU."""

import ctypes
import threading
import time

from ep_jit.symmetric import flag_word
from ep_jit.transports.base import bad_topk_message, next_ticket, wait_for_ticket


def test_wait_for_ticket_sees_a_late_write_and_gives_up_past_its_deadline():
    word = ctypes.c_uint32(0)
    polls = []
    threading.Timer(0.05, lambda: setattr(word, "value", 7)).start()
    assert wait_for_ticket(ctypes.addressof(word), 7, 5.0, lambda: polls.append(1))
    assert polls  # the caller's check ran while waiting

    start = time.monotonic()
    assert not wait_for_ticket(ctypes.addressof(word), 8, 0.2, lambda: None)
    assert 0.2 <= time.monotonic() - start < 2.0


def test_bad_topk_message_names_rank_position_and_range():
    mine = bad_topk_message(1, 2 * 8 + 3, 8, 256, 300)
    assert mine == "topk_idx: expected ids in [-1, 256), got 300 at [2, 3]; no token was moved"
    theirs = bad_topk_message(1, 2 * 8 + 3, 8, 256, None)
    assert "rank 1 passed an id outside that range at [2, 3]" in theirs


def test_tickets_wrap_like_the_uint32_the_kernels_echo():
    assert next_ticket(0) == 1 and next_ticket(2**31 - 1) == 2**31  # past the int32 range
    assert next_ticket(2**32 - 1) == 1  # 0 means "no ticket" and is never issued
    word = ctypes.c_uint32(2**32 - 1)  # what a kernel writes for the last ticket before the wrap
    assert wait_for_ticket(ctypes.addressof(word), 2**32 - 1, 0.1, lambda: None)


def test_the_deadline_counts_from_when_the_device_starts():
    word, started = ctypes.c_uint32(0), ctypes.c_uint32(0)
    start = time.monotonic()
    threading.Timer(0.4, lambda: setattr(started, "value", 5)).start()  # work queued ahead of it
    assert not wait_for_ticket(ctypes.addressof(word), 5, 0.2, lambda: None, started=ctypes.addressof(started))
    assert time.monotonic() - start >= 0.6


def test_flag_words_carry_the_group_tag_the_nonce_and_the_sequence():
    tag = 0x0123456789ABCDEF
    assert flag_word(tag, 0, 7) == 0x0123456700000007
    assert flag_word(tag, 0xFFFFFFFF, 2**32 + 3) == 0xFEDCBA9800000003
