"""One benchmark mode in a process of its own: `python -m gptjax.bench.worker SPEC.json RESULT.json`.

The spec (protocol's docstring) names the mode; the worker looks it up in the table, runs it and writes its Result
as JSON. JAX and PyTorch never share a process, so allocators and thread pools never meet.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from gptjax.bench import modes
from gptjax.bench.timing import peak_rss_bytes

USER_ERROR = 2  # exit status of a worker that found a bad option; its result file is {"user_error": line}


def main(argv: list[str]) -> int:
    from gptjax import parallel
    from gptjax.errors import UserError

    malloc = "reuse_freed_memory" if parallel.process_settings() else "default"
    spec_path, result_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    try:
        result = modes.MODES[spec["mode"]].run(spec)
    except UserError as e:  # an option this device cannot run (--attention=cudnn on a CPU): the runner's to say
        with open(result_path, "w") as f:
            json.dump({"user_error": str(e)}, f)
        return USER_ERROR
    if result.peak_mem_bytes is None:
        result = dataclasses.replace(result, peak_mem_bytes=peak_rss_bytes(), peak_mem_source="process peak RSS")
    with open(result_path, "w") as f:
        json.dump(dataclasses.replace(result, malloc=malloc, xla_flags=os.environ.get("XLA_FLAGS", "")).to_dict(), f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
