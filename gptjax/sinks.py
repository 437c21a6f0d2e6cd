"""Where a run's metrics rows go: metrics.jsonl always, TensorBoard event files (--tensorboard), W&B (--wandb_log)."""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import time
from typing import Protocol

from gptjax.config import Config, TrainConfig
from gptjax.errors import UserError, first_line


class Sink(Protocol):
    """Takes each metrics row ({"step", "train_loss", "val_loss", "lr", "tokens_per_sec", "elapsed_s"}) as it is
    logged; closed once, when the run ends (failed: it ended in an error or a signal)."""

    def write(self, row: dict) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def check(t: TrainConfig) -> None:
    """Refuse, before any work, a sink whose package is not installed."""
    if t.wandb_log:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("--wandb_log needs W&B: pip install 'gptjax[wandb]'") from None


def open_sinks(config: Config, out_dir: str, resume: bool) -> list[Sink]:
    """The sinks config.train asks for, metrics.jsonl's first. `resume`: the run goes on from its latest checkpoint,
    and its rows from that step on are about to be written again."""
    t, sinks = config.train, [Jsonl(os.path.join(out_dir, "metrics.jsonl"))]
    try:
        if t.tensorboard:
            sinks.append(TensorBoard(os.path.join(out_dir, "tensorboard"), resume))
        if t.wandb_log:
            sinks.append(WandB(config, out_dir))
    except BaseException:
        close_sinks(sinks, failed=True)
        raise
    return sinks


def close_sinks(sinks: list[Sink], failed: bool = False) -> None:
    """Close every sink. A run that failed already has its error: one closing too must not replace it."""
    error = None
    for sink in sinks:
        try:
            sink.close(failed=failed)
        except Exception as e:
            error = error or (type(sink).__name__, e)
    if error is not None and not failed:
        first = first_line(error[1], type(error[1]).__name__)
        raise UserError(f"the run is saved, but closing its {error[0]} metrics failed: {first}")


def _numbers(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Jsonl:
    """metrics.jsonl, a row per line; the file is opened for each row, so a killed run keeps every row it logged."""

    def __init__(self, path: str):
        self.path = path

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def close(self, failed: bool = False) -> None:
        pass


# TensorBoard's event file, written without TensorFlow or a protobuf package: a TFRecord file (each record: its
# length, the length's masked CRC-32C, the bytes, their masked CRC-32C) of tensorflow.Event protos.


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ (0x82F63B78 if n & 1 else 0)  # Castagnoli's polynomial, reflected
        table.append(n)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC32C[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masking (a CRC of data that holds CRCs is weak otherwise): rotate right 15, add a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def _varint(n: int) -> bytes:
    assert n >= 0, n
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (a string, bytes or a message)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(step: int, wall_time: float, *, file_version: str = "", scalars: dict[str, float] | None = None,
          session_start: bool = False) -> bytes:
    """tensorflow.Event: wall_time (1, double), step (2, int64) and one of file_version (3), summary (5: a
    Summary.Value (1) per scalar: tag (1), simple_value (2, float)) or session_log (7: status (1) START = 1)."""
    what = (_field(3, file_version.encode()) if file_version else
            _field(7, b"\x08\x01") if session_start else
            _field(5, b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", v))
                               for tag, v in (scalars or {}).items())))
    return b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step) + what


class TensorBoard:
    """Event files in OUT_DIR/tensorboard/, a new one each time the run is trained, named as TensorFlow names them
    (TensorBoard reads a directory's files in name order): a scalar per metrics value, at the row's step."""

    _count = itertools.count()  # two files a process opens within one second still sort in the order opened

    def __init__(self, logdir: str, resume: bool):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(self._count)}"
        self.file = open(os.path.join(logdir, name), "xb")
        self.restart = resume
        try:
            self._put(event(0, time.time(), file_version="brain.Event:2"))  # version 2: purges follow SessionLog STARTs
        except BaseException:
            self.file.close()
            raise

    def _put(self, ev: bytes) -> None:
        self.file.write(tfrecord(ev))
        self.file.flush()  # TensorBoard shows each row while the run trains

    def write(self, row: dict) -> None:
        step, now = int(row["step"]), time.time()
        if self.restart:  # metrics.jsonl lost its rows from this step on; TensorBoard drops the old files' points too
            self._put(event(step, now, session_start=True))
            self.restart = False
        self._put(event(step, now, scalars=_numbers(row)))

    def close(self, failed: bool = False) -> None:
        self.file.close()


class WandB:
    """A Weights & Biases run: config.json's settings as its config, each row at its step. WANDB_MODE=offline logs
    without a network (`wandb sync` uploads later); its files go in OUT_DIR/wandb/ unless WANDB_DIR says elsewhere.
    A resumed run starts a new W&B run of the same name, as nanoGPT's does."""

    def __init__(self, config: Config, out_dir: str):
        import wandb

        t = config.train
        name = t.wandb_run_name or os.path.basename(os.path.abspath(out_dir))
        try:
            self.run = wandb.init(project=t.wandb_project, name=name, config=config.to_dict(),
                                  dir=None if os.environ.get("WANDB_DIR") else out_dir)
        except Exception as e:  # not logged in, no network: W&B's own words, on one line
            reason = " ".join(str(e).split()) or type(e).__name__
            raise UserError(f"--wandb_log: W&B did not start: {reason}; run `wandb login`, or set WANDB_MODE=offline "
                            "to log without a network") from None

    def write(self, row: dict) -> None:
        self.run.log(_numbers(row), step=int(row["step"]))

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
