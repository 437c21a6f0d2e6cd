"""Multi-host start-up (jax.distributed, with a watchdog and one-line errors) and what the processes of a run agree on:
which one leads (prints and writes the run's files), and barriers. jax is imported inside the functions."""

from __future__ import annotations

import os
import sys

from gptjax.errors import UserError, first_line


def is_lead() -> bool:
    """Whether this is the process that prints and writes the run's files (process 0)."""
    import jax

    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait for every process to get here (a no-op in one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_coordinator(address: str) -> None:
    """--coordinator_address must be HOST:PORT with a port in 1..65535 and a host that resolves: one line now
    rather than a silent wait that ends in the runtime's abort."""
    import socket

    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise UserError(f"--coordinator_address={address}: write HOST:PORT, e.g. 10.0.0.1:1234")
    if not 1 <= int(port) <= 65535:
        raise UserError(f"--coordinator_address={address}: port {port} is not in 1..65535")
    try:
        socket.getaddrinfo(host.strip("[]"), int(port))
    except (OSError, UnicodeError) as e:
        raise UserError(f"--coordinator_address={address}: host {host} does not resolve ({e}); name a host or an "
                        "IP address that every process can reach") from None


def init_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
                     distributed_timeout: int = 120) -> None:
    """jax.distributed.initialize: detects SLURM, Open MPI and TPU pods by itself, or takes the three values.

    Every process must connect within distributed_timeout seconds. The runtime aborts the whole process with a C++
    stack when its own deadline passes, so a watchdog thread ends the process first, with one line naming what did
    not answer (the runtime waits in C++ with the GIL released)."""
    import threading

    import jax

    given = {k: v for k, v in (("coordinator_address", coordinator_address), ("num_processes", num_processes or None),
                               ("process_id", None if process_id < 0 else process_id)) if v not in ("", None)}
    if given and len(given) != 3:
        raise UserError("--distributed: pass all of --coordinator_address=HOST:PORT, --num_processes=N and "
                        "--process_id=I, or none of them on SLURM or a TPU pod")
    if given:
        check_coordinator(coordinator_address)
        if process_id >= num_processes:
            raise UserError(f"--process_id={process_id} must be below --num_processes={num_processes}")
        where = f"the coordinator at {coordinator_address}"
        if process_id == 0:
            waited = f"{num_processes - 1} other process(es) to connect to {where} (this process serves it)"
        else:
            waited = f"{where} to answer and all {num_processes} processes to connect (is process 0 running there?)"
    else:
        waited = "the cluster's processes to connect"

    def give_up():
        print(f"gptjax: error: --distributed: waited {distributed_timeout} s for {waited}; start every process, or "
              "raise --distributed_timeout", file=sys.stderr, flush=True)
        os._exit(2)

    watchdog = threading.Timer(distributed_timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**given, initialization_timeout=distributed_timeout + 60)
    except (ValueError, RuntimeError) as e:
        first = first_line(e, type(e).__name__)
        raise UserError(f"--distributed: jax.distributed.initialize failed ({first}); outside SLURM or a TPU pod, "
                        "pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I") from None
    finally:
        watchdog.cancel()
