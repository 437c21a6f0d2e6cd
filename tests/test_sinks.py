"""Metrics sinks: TensorBoard's reader reads metrics.jsonl's values back from the event files, an offline W&B run
holds the rows, a missing W&B is one line, and a failed run closes its sinks without hiding its error."""

import json
import struct

import numpy as np
import pytest
from conftest import user_error

from gptjax import cli, sinks
from gptjax.config import FIXED_ON_RESUME, override, resumed
from gptjax.errors import UserError
from gptjax.run import Run
from gptjax.train import train

FAST = {"max_iters": 4, "eval_interval": 2, "eval_iters": 1}
WATCH = ("tensorboard", "wandb_log", "wandb_project", "wandb_run_name")


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) points, as TensorBoard's own reader loads the directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _as_float32(rows) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's values as an event's simple_value (a float32) holds them."""
    return {k: [(r["step"], float(np.float32(r[k]))) for r in rows] for k in rows[0] if k != "step"}


def test_crc32c_is_castagnoli():
    assert sinks.crc32c(b"123456789") == 0xE3069283  # CRC-32C's check value
    assert sinks.crc32c(b"") == 0


def test_tensorboard_reads_metrics_jsonl_back(tiny_config, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train(override(tiny_config, {**FAST, "out_dir": str(out), "tensorboard": True}), progress=False)
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 2, 4]
    points = _scalars(out / "tensorboard")
    assert {"train_loss", "val_loss", "lr", "tokens_per_sec"} <= set(points)
    assert points == _as_float32(rows)

    # A resume rewrites step 4's row (its tokens_per_sec differs): TensorBoard shows the new one, once.
    train(override(tiny_config, {**FAST, "out_dir": str(out), "tensorboard": True, "max_iters": 6,
                                 "init_from": "resume"}), progress=False)
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    assert len(list((out / "tensorboard").iterdir())) == 2
    assert _scalars(out / "tensorboard") == _as_float32(rows)


def _wandb_records(path) -> list:
    """The records of W&B's transaction log: a 7-byte file header, then LevelDB's log format (32 KiB blocks of
    records, each behind a 7-byte header: CRC, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    pos, part, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(part))
            part = b""
    return records


def test_wandb_offline_run_holds_the_rows(tiny_config, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for key in ("CONFIG", "CACHE", "DATA", "ARTIFACT"):  # nothing of W&B's lands in the user's home
        monkeypatch.setenv(f"WANDB_{key}_DIR", str(tmp_path / f"wandb-{key.lower()}"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # unset: the W&B run's files go in out_dir
    out = tmp_path / "run"
    train(override(tiny_config, {**FAST, "out_dir": str(out), "wandb_log": True, "wandb_project": "sinks"}),
          progress=False)
    rows = _rows(out)
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (log,) = run_dir.glob("run-*.wandb")
    records = _wandb_records(log)
    kinds = [r.WhichOneof("record_type") for r in records]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name) == ("sinks", "run")  # the run's name: out_dir's
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["model"]["n_layer"] == 2 and config["train"]["max_iters"] == 4
    history = [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [r["step"] for r in rows] == [0, 2, 4]
    assert [{k: v for k, v in h.items() if not k.startswith("_")} for h in history] == \
           [{k: v for k, v in r.items() if k != "step"} for r in rows]
    assert kinds[-1] == "exit" and records[-1].exit.exit_code == 0


def test_wandb_missing_is_one_line(capsys, shakespeare, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # `import wandb` raises ImportError
    out = tmp_path / "run"
    line = user_error(capsys, "train", "--config=tiny", f"--input={shakespeare}", f"--out_dir={out}",
                      "--wandb_log=true")
    assert line == "gptjax: error: --wandb_log needs W&B: pip install 'gptjax[wandb]'"
    assert not out.exists()  # refused before any work


def test_a_failed_run_closes_its_sinks_and_keeps_its_error(tiny_config, tmp_path, monkeypatch):
    closed = []

    def close(self, failed=False):
        self.file.close()
        closed.append(failed)
        raise OSError("closing failed too")  # must not replace the run's own error

    def save(*args, **kwargs):
        raise RuntimeError("the run's own error")

    monkeypatch.setattr(sinks.TensorBoard, "close", close)
    monkeypatch.setattr(Run, "save", save)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the run's own error"):
        train(override(tiny_config, {**FAST, "out_dir": str(out), "tensorboard": True}), progress=False)
    assert closed == [True]
    assert not out.exists()  # a fresh run that failed leaves nothing, its event files included


def test_a_sink_that_cannot_close_after_a_good_run_is_one_line():
    class Stuck:
        def close(self, failed=False):
            raise ConnectionError("wandb: network is unreachable\n  (more lines)")

    with pytest.raises(UserError, match=r"^the run is saved, but closing its Stuck metrics failed: wandb: network is "
                                        r"unreachable$"):
        sinks.close_sinks([Stuck()])


def test_watch_settings_change_on_resume_and_show_in_help(tiny_config, capsys):
    assert not set(WATCH) & set(FIXED_ON_RESUME)
    config, changes = resumed(tiny_config, {"tensorboard": "true", "wandb_log": "true", "wandb_project": "p",
                                            "wandb_run_name": "r"})
    assert (config.train.tensorboard, config.train.wandb_log) == (True, True) and len(changes) == 4
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for key in WATCH:
        assert f"--{key}" in out
    assert "OUT_DIR/tensorboard/" in out and "gptjax[wandb]" in out
