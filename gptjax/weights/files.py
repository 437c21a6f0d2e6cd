"""A run to another framework's files and back (`gptjax export` / `gptjax import`): checks first, atomic writes."""

from __future__ import annotations

import os

from gptjax import checkpoint, rundir, tokenizers, writes
from gptjax.errors import UserError
from gptjax.weights import FORMATS


def export(fmt: str, out_dir: str, path: str, force: bool = False, which: str | int = "best") -> dict:
    """Write the run's checkpoint `which` (best by default) in format fmt to path, with the files the format puts
    beside it; {path, vocab (a vocabulary file written beside it, or None), step, tensors}."""
    row = FORMATS[fmt]
    m = row.load()
    (check_directory if row.directory else check_target)(path, row.example)
    if not force and os.path.lexists(path) and not (row.directory and not os.listdir(path)):
        raise UserError(f"{path} exists: pick another {'directory' if row.directory else 'file'} or pass --force to "
                        "overwrite it")
    config, _, state = rundir.load_state(out_dir, which)
    files, summary = m.export_files(config, state, out_dir, path, force)
    os.makedirs(path if row.directory else os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for p, write in files:
        writes.atomic_write(p, write)
    return {"path": path, **summary}


def import_run(fmt: str, path: str, out_dir: str, vocab: str | None = None, force: bool = False):
    """Make a gptjax run directory (config, tokenizer, best/latest checkpoints) from a file in format fmt;
    (config, state). vocab names a vocabulary file where the format takes one (nanoGPT's meta.pkl)."""
    config, state, tok = FORMATS[fmt].load().read(path, out_dir, vocab)  # every check before anything is written
    rundir.check_writable(out_dir)
    rundir.claim_out_dir(out_dir, force, "pick another --out_dir or pass --force to replace it", remove=False)
    with rundir.run_lock(out_dir, "import"):
        aside = rundir.set_aside(out_dir) if force else []  # the replaced run, until the new one is saved
        try:
            rundir.write_json(os.path.join(out_dir, "config.json"), config.to_dict())
            tokenizers.save(tok, os.path.join(out_dir, "tokenizer.json"))
            checkpoint.save(out_dir, int(state.step), state, keep=config.train.keep_checkpoints, best=True)
        except BaseException:
            rundir.remove_run_files(out_dir)
            rundir.put_back(aside)
            raise
        rundir.drop_aside(aside)
    return config, state


def check_directory(path: str, example: str) -> None:
    """PATH is a directory, or can be made, and takes new files: checked before any work, as check_target does."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"{path} is a file: the format writes a directory of files; name a directory, e.g. "
                        f"{os.path.join(os.path.dirname(path), example)}")
    _probe(path, path)


def check_target(path: str, example: str) -> None:
    """PATH is not a directory and its directory can be made and takes a new file: checked before any work, with a
    probe file, removed again with every directory made for it."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory: name the file to write inside it, e.g. "
                        f"{os.path.join(path, example)}")
    _probe(path, os.path.dirname(os.path.abspath(path)))


def _probe(path: str, where: str) -> None:
    """writes.probe(where) for an export to path; what stops it is one line."""
    try:
        writes.probe(where)
    except NotADirectoryError as e:
        raise UserError(f"{path}: {e.filename} is a file, so the directory cannot be made; export to another path"
                        ) from None
    except OSError as e:
        raise UserError(f"{path}: cannot write in {where} ({e.strerror or e}); export to a directory you can write "
                        "to") from None
