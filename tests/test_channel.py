"""The per-layer data plane in one process: arena, doorbell, channel errors, and the layer scheduler's hop."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from scheduler.channel import ArenaLayout, ColdChannel, ColdExecutorError, LayerArena, LayerReply, LayerRequest, Op, \
    serve_cold
from scheduler.doorbell import Doorbell, DoorbellListener
from scheduler.layer_scheduler import ArenaViews, LayerScheduler

LAYOUT = ArenaLayout(max_rows=4, hidden_size=8, num_neurons=6)


def test_arena_is_shared_private_and_removed_by_its_owner_only() -> None:
    owner = LayerArena(LAYOUT)
    path = f"/dev/shm/{owner.name}"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    peer = LayerArena(owner.layout, name=owner.name)
    owner.x[:] = 3.0
    peer.y_cold[1] = 7.0
    peer.mask[2, 5] = True
    assert (peer.x == 3.0).all() and (owner.y_cold[1] == 7.0).all() and owner.mask[2, 5]
    assert owner.x.shape == (4, 8) and owner.mask.shape == (4, 6) and owner.mask.dtype == np.bool_
    peer.close()
    assert os.path.exists(path)                          # a peer never removes the owner's segment
    owner.close()
    assert not os.path.exists(path)


def test_an_attached_process_leaves_the_segment_at_exit() -> None:
    """Python's resource tracker would unlink a segment any process attached to; the peer unregisters it."""
    owner = LayerArena(LAYOUT)
    code = ("import sys; from scheduler.channel import ArenaLayout, LayerArena; "
            "a = LayerArena(ArenaLayout(4, 8, 6), name=sys.argv[1]); a.x[0, 0] = 5.0; a.close()")
    subprocess.run([sys.executable, "-c", code, owner.name], check=True, timeout=60)
    assert os.path.exists(f"/dev/shm/{owner.name}") and owner.x[0, 0] == 5.0
    owner.close()


@pytest.fixture
def bells() -> Iterator[tuple[Doorbell, Callable[[], Doorbell]]]:
    """(hot end, accept the cold end): a real SEQPACKET socket pair in a private directory."""
    listener = DoorbellListener()
    assert stat.S_IMODE(os.stat(os.path.dirname(listener.path)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(listener.path).st_mode) == 0o600
    accepted: list[Doorbell] = []
    hot = Doorbell.connect(listener.path)
    yield hot, lambda: accepted.append(listener.accept(timeout_s=10)) or accepted[-1]
    hot.close()
    for b in accepted:
        b.close()
    listener.close()
    assert not os.path.exists(listener.path)


def _serve(cold: Doorbell, work: Callable[[int, int], None]) -> threading.Thread:
    t = threading.Thread(target=serve_cold, args=(cold, work), daemon=True)
    t.start()
    return t


def test_requests_are_answered_in_order_with_their_timing(bells) -> None:
    hot, accept = bells
    done: list[tuple[int, int]] = []
    thread = _serve(accept(), lambda layer, n: done.append((layer, n)))
    channel = ColdChannel(hot, timeout_s=10)
    channel.ping()
    for layer in range(3):
        reply = channel.wait(channel.request(layer, layer + 1), layer)
        assert reply.ok and reply.error == "" and reply.start_ns <= reply.end_ns
    assert done == [(0, 1), (1, 2), (2, 3)]
    channel.close()                                      # STOP ends the cold loop
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_a_failure_on_the_cold_side_is_answered_and_raised(bells) -> None:
    hot, accept = bells

    def work(layer: int, n: int) -> None:
        if layer == 1:
            raise RuntimeError("out of cheese")

    _serve(accept(), work)
    channel = ColdChannel(hot, timeout_s=10)
    channel.wait(channel.request(0, 1), 0)
    with pytest.raises(ColdExecutorError, match="failed on layer 1: RuntimeError: out of cheese"):
        channel.wait(channel.request(1, 1), 1)
    channel.wait(channel.request(2, 1), 2)                 # the loop goes on after a failed layer
    hot.send(*LayerRequest(7, 99, 0, 1))                   # an op it does not know
    assert LayerReply(*hot.recv())[:2] == (99, False)
    hot.send("not", "a request")
    assert LayerReply(*hot.recv())[1] is False


def test_an_answer_out_of_order_is_an_error(bells) -> None:
    hot, accept = bells
    cold = accept()
    channel = ColdChannel(hot, timeout_s=10)
    seq = channel.request(0, 1)
    assert LayerRequest(*cold.recv()) == (Op.FFN, seq, 0, 1)
    cold.send(*LayerReply(seq + 5, True, 0, 0, ""))
    with pytest.raises(ColdExecutorError, match=f"answered seq {seq + 5} for seq {seq}"):
        channel.wait(seq, 0)
    cold.send(1, 2)                                        # a reply of the wrong shape
    with pytest.raises(ColdExecutorError, match="malformed reply"):
        channel.wait(seq, 0)


def test_silence_times_out_and_a_dead_peer_is_detected(bells) -> None:
    hot, accept = bells
    cold = accept()
    channel = ColdChannel(hot, timeout_s=0.2)
    seq = channel.request(3, 1)                            # nobody answers
    with pytest.raises(ColdExecutorError, match="did not answer layer 3 within 0.2s"):
        channel.wait(seq, 3)
    cold.close()                                           # the cold executor dies
    with pytest.raises(ColdExecutorError, match="died during layer 4|unreachable at layer 4"):
        channel.wait(channel.request(4, 1), 4)


def test_a_socket_dir_left_by_a_killed_owner_is_swept_by_the_next_listener() -> None:
    code = ("from scheduler.doorbell import DoorbellListener; import time; l = DoorbellListener(); "
            "print(l.path, flush=True); time.sleep(120)")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    left = os.path.dirname(owner.stdout.readline().strip())
    assert os.path.isdir(left)
    owner.kill()                                           # kill -9: no close(), no cleanup
    owner.wait(timeout=30)
    owner.stdout.close()
    mine = DoorbellListener()                              # another owner's live directory stays
    try:
        assert not os.path.exists(left) and os.path.isdir(os.path.dirname(mine.path))
    finally:
        mine.close()


def test_a_hung_peer_is_caught_at_a_deadline_sized_to_the_layers_it_answered(bells) -> None:
    """After the warm-up layers the deadline is slack x the slowest answer per row (floor_s at least), far below
    timeout_s: a cold side that stops answering (hung, not dead) fails the layer that soon."""
    hot, accept = bells
    cold = accept()
    channel = ColdChannel(hot, timeout_s=30, floor_s=0.3, slack=5, warmup=2)
    assert channel.deadline_s(1) == 30
    for layer in range(3):                                 # answered at once
        seq = channel.request(layer, 1)
        cold.recv()
        cold.send(*LayerReply(seq, True, 0, 0, ""))
        channel.wait(seq, layer)
    assert channel.deadline_s(1) == pytest.approx(0.3) and channel.deadline_s(10**9) == 30
    seq = channel.request(3, 1)                            # ... then silence
    with pytest.raises(ColdExecutorError, match=r"did not answer layer 3 within 0.3s \(hung\?\)"):
        channel.wait(seq, 3)


class ColdSide:
    """A cold executor in a thread: y_cold = x @ w_cold (masked per row by the broadcast mask, if any)."""

    def __init__(self, arena: LayerArena, bell: Doorbell, w: torch.Tensor, use_mask: bool) -> None:
        self.peer = LayerArena(arena.layout, name=arena.name)
        self.w, self.use_mask, self.seen = w, use_mask, []
        self.thread = _serve(bell, self.work)

    def work(self, layer: int, n: int) -> None:
        x = torch.from_numpy(self.peer.x[:n])
        self.seen.append((layer, n))
        y = x @ self.w
        if self.use_mask:
            y = y * torch.from_numpy(self.peer.mask[:n, :1]).float()     # reads the mask the hot side wrote
        self.peer.y_cold[:n] = y.numpy()


@pytest.mark.parametrize("use_mask", [False, True])
def test_layer_scheduler_hop_equals_hot_plus_cold_and_chunks_long_inputs(bells, use_mask: bool) -> None:
    hot_bell, accept = bells
    arena = LayerArena(LAYOUT)
    g = torch.Generator().manual_seed(0)
    w_hot, w_cold = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    cold = ColdSide(arena, accept(), w_cold, use_mask)
    views = ArenaViews(*(torch.from_numpy(a) for a in (arena.x, arena.y_cold, arena.mask)),
                       device=torch.device("cpu"), dtype=torch.float32)
    predictor = (lambda layer, h: h[:, :6] > 0) if use_mask else None
    hot = lambda layer, h, mask: h @ w_hot                               # noqa: E731
    sched = LayerScheduler(ColdChannel(hot_bell, 10), views, hot, predictor, [True, False, True], [True, True, False])
    sched.is_tracing = True
    h = torch.randn(10, 8, generator=g)                                  # 10 rows > 4 arena rows: 3 chunks
    cold_part = h @ w_cold * ((h[:, :1] > 0).float() if use_mask else 1)
    assert torch.allclose(sched.ffn(0, h), h @ w_hot + cold_part, atol=1e-5)
    assert cold.seen == [(0, 4), (0, 4), (0, 2)]
    assert torch.allclose(sched.ffn(1, h[:3]), cold_part[:3], atol=1e-5)   # no hot neurons: the cold part alone
    assert torch.allclose(sched.ffn(2, h[:3]), h[:3] @ w_hot, atol=1e-5)   # no cold neurons: nothing is sent
    assert cold.seen[-1] == (1, 3) and len(cold.seen) == 4
    sides = [(e.layer, e.side) for e in sched.events]
    assert sides.count((0, "cold")) == 3 and (2, "cold") not in sides and (2, "hot") in sides
    sched.close()
    cold.thread.join(timeout=10)
    cold.peer.close()
    arena.close()
