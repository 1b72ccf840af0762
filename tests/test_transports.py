"""Host-side pieces of the transports that need no GPU."""

import ctypes
import threading
import time

from ep_jit.transports import bad_topk_message, wait_for_ticket


def test_wait_for_ticket_sees_a_late_write_and_gives_up_past_its_deadline():
    word = ctypes.c_int(0)
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
