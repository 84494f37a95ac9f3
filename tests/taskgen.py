"""
Deterministic task output for the end-to-end task tests: the same module is
the task (run as a script by ``/bin/sh -c``) and the oracle (imported by the
test to compute the bytes the control plane must end up with).

As a script::

    python taskgen.py stream NBYTES SEED [STDERR_NBYTES]
        NBYTES of text on stdout (and STDERR_NBYTES on stderr), written in
        pieces of pseudo-random sizes so that the agent's reads cut the
        stream anywhere, multi-byte UTF-8 characters included.
    python taskgen.py interleave COUNT
        ``out <i>`` on stdout then ``err <i>`` on stderr, COUNT times, each
        line flushed at once: the two streams are interleaved in time.
    python taskgen.py paced NBYTES SECONDS SEED [PROGRESS_FILE]
        NBYTES of stdout spread evenly over about SECONDS; after each write
        the bytes written so far go to PROGRESS_FILE (when given), which is
        how a test sees a task blocked on a full pipe.
    python taskgen.py counted RUNS_FILE DONE_FILE NBYTES SECONDS SEED EXIT [STDERR_NBYTES]
        The chaos harness's task (evidence/chaos_tasks.py): first appends one
        line ``run pgid=<its process group>`` to RUNS_FILE (flushed to disk),
        then prints like ``paced`` (and STDERR_NBYTES on stderr at the end),
        then writes DONE_FILE (JSON: its exit code and the digests and sizes of
        what it printed on each stream, written atomically) and exits with
        EXIT.  A task that was killed has a RUNS_FILE line and no DONE_FILE.

The text is built from an alphabet with one-, two-, three- and four-byte
UTF-8 characters, every line numbered: a lost, repeated or reordered chunk,
or a character split and replaced by U+FFFD, changes the bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,-éßø€✓漢字😀🚀"


def stream_bytes(nbytes: int, seed: int) -> bytes:
    """Exactly ``nbytes`` of numbered UTF-8 lines (the last one possibly cut, at a boundary)."""
    rng = random.Random(seed)
    block = "".join(rng.choice(ALPHABET) for _ in range(8192))
    parts: list[bytes] = []
    size = 0
    i = 0
    while size < nbytes:
        start = (i * 7919) % 4096
        line = f"{i:08d} {block[start:start + 40 + i % 120]}\n".encode()
        parts.append(line)
        size += len(line)
        i += 1
    data = b"".join(parts)[:nbytes]
    # Never end inside a character: step back over continuation bytes.
    end = len(data)
    while end and (data[end - 1] & 0xC0) == 0x80:
        end -= 1
    if end and data[end - 1] >= 0xC0:
        end -= 1
    return data[:end] + b"." * (len(data) - end)


def interleaved(count: int) -> tuple[bytes, bytes]:
    """What ``interleave COUNT`` writes: (stdout, stderr)."""
    return (
        "".join(f"out {i}\n" for i in range(count)).encode(),
        "".join(f"err {i}\n" for i in range(count)).encode(),
    )


def digest(data: bytes) -> str:
    """The sha256 hex digest the tests compare."""
    return hashlib.sha256(data).hexdigest()


def _write_pieces(fd: int, data: bytes, rng: random.Random) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view[: rng.randint(1, 40000)])
        view = view[n:]


def _paced(nbytes: int, seconds: float, seed: int, progress: str | None) -> None:
    data = stream_bytes(nbytes, seed)
    steps = 40
    piece = max(1, len(data) // steps + 1)
    written = 0
    for start in range(0, len(data), piece):
        view = memoryview(data)[start : start + piece]
        while view:
            n = os.write(1, view[:4096])
            view = view[n:]
            written += n
            if progress is not None:
                with open(progress + ".tmp", "w") as f:
                    f.write(str(written))
                os.replace(progress + ".tmp", progress)
        # The task's own pacing (this runs as the task, a child process):
        # what it simulates is a command that prints over time.
        time.sleep(seconds / steps)


def _append_line(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _counted(argv: list[str]) -> int:
    runs, done, nbytes, seconds, seed, code = argv[:6]
    err_nbytes = int(argv[6]) if len(argv) > 6 else 0
    _append_line(runs, f"run pgid={os.getpgid(0)}\n")
    out = stream_bytes(int(nbytes), int(seed))
    _paced(len(out), float(seconds), int(seed), None)
    err = stream_bytes(err_nbytes, int(seed) + 1) if err_nbytes else b""
    if err:
        _write_pieces(2, err, random.Random(int(seed)))
    summary = {
        "exit": int(code),
        "stdout": digest(out), "stdout_bytes": len(out),
        "stderr": digest(err), "stderr_bytes": len(err),
    }
    with open(done + ".tmp", "w") as f:
        json.dump(summary, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(done + ".tmp", done)
    return int(code)


def main(argv: list[str]) -> None:
    mode = argv[1]
    if mode == "stream":
        rng = random.Random(int(argv[3]))
        _write_pieces(1, stream_bytes(int(argv[2]), int(argv[3])), rng)
        if len(argv) > 4:
            _write_pieces(2, stream_bytes(int(argv[4]), int(argv[3]) + 1), rng)
    elif mode == "interleave":
        for i in range(int(argv[2])):
            os.write(1, f"out {i}\n".encode())
            os.write(2, f"err {i}\n".encode())
    elif mode == "paced":
        _paced(int(argv[2]), float(argv[3]), int(argv[4]), argv[5] if len(argv) > 5 else None)
    elif mode == "counted":
        sys.exit(_counted(argv[2:]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv)
