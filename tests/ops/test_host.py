"""ops._host.Fork on the CPU, with stand-ins for CUDA's streams and events: the order of its host calls."""
import threading

import pytest
import torch

from mosa_attention.ops import _host


@pytest.fixture
def cuda_log(monkeypatch):
    """Stand-ins for the CUDA calls Fork makes; each call logged as a tuple."""
    log, current = [], ["main"]

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_event(self, event):
            log.append(("wait", self.name, event.name))

    class Event:
        made = 0

        def __init__(self):
            Event.made += 1
            self.name = f"event{Event.made}"

        def record(self, stream):
            log.append(("record", self.name, stream.name))

    monkeypatch.setattr(_host, "side_stream", lambda device, key: Stream("side"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(current[0]))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: (log.append(("set", stream.name)),
                                                                  current.__setitem__(0, stream.name)))
    monkeypatch.setattr(_host, "_EVENTS", threading.local())
    return log, current


def test_fork_waits_runs_on_the_side_stream_and_joins(cuda_log):
    log, current = cuda_log
    fork = _host.Fork("cuda:0", "key")
    assert fork.run(lambda: current[0]) == "side"       # fn runs with the side stream current
    ev = log[0][1]
    assert log == [("record", ev, "main"), ("wait", "side", ev), ("set", "side"), ("set", "main")]
    log.clear()
    fork.run(lambda: None, wait=False)                   # nothing launched on main since: no second wait
    assert log == [("set", "side"), ("set", "main")]
    log.clear()
    with pytest.raises(ZeroDivisionError):               # the caller's stream comes back also on an error
        fork.run(lambda: 1 / 0)
    assert current[0] == "main" and log[-1] == ("set", "main")
    log.clear()
    fork.join()
    assert log[0][0] == "record" and log[0][2] == "side" and log[1] == ("wait", "main", log[0][1])
    assert log[0][1] != ev                               # the join's event is not the fork's


def test_fork_events_are_made_once_per_device_and_thread(cuda_log):
    log, _ = cuda_log
    a, b = _host.Fork("cuda:0", "key"), _host.Fork("cuda:0", "key")
    assert (a._forked, a._joined) == (b._forked, b._joined)
    assert _host.Fork("cuda:1", "key")._forked is not a._forked
    other = _host.in_own_thread(lambda: _host.Fork("cuda:0", "key"))
    assert other._forked is not a._forked and other._joined is not a._joined


def test_kernels_launch_on_their_tensors_device(monkeypatch):
    # Triton launches on the current device: the ops' entry points switch to their first tensor's device where
    # it is another (cuda:1 while cuda:0 is current), and only there
    seen, current = [], [0]

    class Device:
        def __init__(self, dev):
            self.index = dev.index

        def __enter__(self):
            seen.append(("enter", self.index))
            current.insert(0, self.index)

        def __exit__(self, *exc):
            current.pop(0)
            seen.append(("exit", self.index))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", Device)

    class Tensor:
        def __init__(self, device):
            self.device = torch.device(device)

    @_host.on_its_device
    def op(t, x, key=None):
        """the op's doc"""
        return (current[0], x, key)
    assert op(Tensor("cuda:1"), 5, key="k") == (1, 5, "k") and seen == [("enter", 1), ("exit", 1)]
    seen.clear()
    assert op(Tensor("cuda:0"), 6) == (0, 6, None) and op(Tensor("cpu"), 7) == (0, 7, None) and seen == []
    assert op.__doc__ == "the op's doc" and op.__name__ == "op"
    # every op that launches kernels from the caller's thread has it (a backward runs on autograd's thread for
    # its device, which sets that device)
    from mosa_attention.ops import triton_combine, triton_mosa, triton_rope, triton_routing
    for fn in (triton_mosa.mosa_triton, triton_mosa.sparse_attention_triton, triton_routing.topk_positions_triton,
               triton_routing.route_logits_triton, triton_rope.split_rope_triton, triton_combine.add_at_rows_triton):
        assert fn.__wrapped__.__name__ == fn.__name__, fn
