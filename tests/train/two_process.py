"""Run a test script as 2 local processes (ranks 0 and 1 over gloo), the way torchrun would, and fail with their
output if either exits non-zero. The script reads its rank from argv[1] and the rendezvous port from argv[2]."""

from __future__ import annotations

import socket
import subprocess
import sys


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_two_processes(script: str, timeout: float = 300) -> None:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", script, str(rank), port], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    failed = [(rank, p.returncode, out) for rank, (p, out) in enumerate(zip(procs, outputs)) if p.returncode != 0]
    assert not failed, "\n".join(f"rank {rank} exited {rc}:\n{out[-3000:]}" for rank, rc, out in failed)
