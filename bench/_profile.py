"""Where the server's time went: py-spy raw (collapsed) stacks summed by phase, and the top frames.

A sample belongs to the phase of its innermost frame that names one (a frame
naming two takes the first in PHASES order): an inline request's kernels run
inside the metrics interceptor's wrapper, and are compute, not interceptor,
time. The monitoring worker's samples are monitoring whatever they call. Idle samples (threads waiting on a queue, the
event loop or the gRPC poller in epoll) are counted apart and left out of the
percentages.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

IDLE = ("_queue_SimpleQueue_get", "select_epoll_poll", "epoll_wait", "pthread_cond_timedwait", "sem_wait", "PyThread_acquire_lock_timed")
# The monitoring worker's modules: a sample with one of them anywhere in its stack is monitoring, kernels included.
MONITORING = tuple(
    f"monitoring/{m}.py" for m in ("core", "worker", "statistics", "calibration", "small_calibration", "exporter", "history")
)
PHASES: list[tuple[str, tuple[str, ...]]] = [
    ("decode", ("decode_request_tensors", "decode_tensor", "to_torch")),
    ("encode", ("evaluation_to_proto", "SerializeToString", "upb_Encode", "_upb_Encode")),
    ("protobuf parse", ("upb_Decode", "FromString", "ParseFromString")),
    ("interceptor", ("monitoring/interceptor.py",)),
    ("compute", ("(kernels/", "lossd/kernels/")),
    ("service (other)", ("server/service.py", "server/convert.py", "server/errors.py")),
    ("gRPC core (receive/send)", ("cygrpc", "_poll_wrapper", "libgrpc", "grpc/_cython", "grpc/aio", "_cygrpc")),
    ("event loop / thread hops", ("asyncio/", "concurrent/futures", "threading.py")),
]


def load(path: Path) -> list[tuple[list[str], int]]:
    """(frames root first, count) per line of a py-spy raw file."""
    out = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            out.append((stack.split(";"), int(count)))
    return out


def phase_of(frames: list[str]) -> str:
    """The phase of one sample, or "idle"."""
    text = ";".join(frames)
    if any(marker in frame for marker in IDLE for frame in frames[-3:]) or "_queue_SimpleQueue_get" in text:
        return "idle"
    if any(marker in frame for frame in frames for marker in MONITORING):
        return "monitoring"
    for frame in reversed(frames):
        for name, markers in PHASES:
            if any(marker in frame for marker in markers):
                return name
    return "other"


def summarize(path: Path, top: int = 15) -> str:
    """Phases as % of busy samples, busy samples per thread, then the top Python frames."""
    stacks = load(path)
    phases: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    frames_py: Counter[str] = Counter()
    for frames, count in stacks:
        phase = phase_of(frames)
        phases[phase] += count
        if phase == "idle":
            continue
        threads[frames[0].split(": ", 1)[-1]] += count
        python = [f for f in frames if ".py:" in f]
        if python:
            frames_py[python[-1].rsplit(":", 1)[0] + ")"] += count
    busy = sum(phases.values()) - phases["idle"]
    lines = [f"{busy} busy samples ({phases['idle']} idle left out)", "phase:"]
    lines += [f"  {count / busy:6.1%}  {name}" for name, count in phases.most_common() if name != "idle"]
    lines.append("busy samples by thread:")
    lines += [f"  {count / busy:6.1%}  {name}" for name, count in threads.most_common(8)]
    lines.append("innermost Python frame:")
    lines += [f"  {count / busy:6.1%}  {name}" for name, count in frames_py.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    for name in sys.argv[1:]:
        print(f"{name}\n{summarize(Path(name))}\n")
