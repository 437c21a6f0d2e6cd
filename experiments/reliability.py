"""Bad inputs across every command, and a run killed with SIGKILL again and again: what a user sees.

    python experiments/reliability.py --input=PATH/tinyshakespeare/input.txt [--out=experiments/results/reliability.md]

Each case runs `gptjax ...` in a subprocess, as a user would, in a scratch directory holding a trained tiny run, a
damaged copy of it, a nanoGPT export and edited copies of that export. For each it records the exit status, the
line printed on stderr (the progress bar stripped), whether a traceback was printed, and whether any file that
existed before the command changed. Then the crash test of tests/crashing.py: SIGKILL at 10 moments, the plain
resume each time, and the comparison with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from conftest import BAR, CACHE_DAMAGE, DAMAGE, damage_run, digest  # noqa: E402
from crashing import crash_and_resume, metrics  # noqa: E402

from gptjax.args import Option, options  # noqa: E402


def gptjax(*args, cwd=None, env=None, timeout=600, cwd_deleted=False):
    """`gptjax ARGS` in a subprocess: (result, seconds). cwd_deleted: run it from a directory removed under it."""
    t = time.perf_counter()
    argv = [sys.executable, "-m", "gptjax", *args]
    if cwd_deleted:
        import shlex

        gone = tempfile.mkdtemp(prefix="gptjax-gone-")
        argv = ["sh", "-c", f"cd {gone} && rmdir {gone} && exec {' '.join(map(shlex.quote, argv))}"]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=dict(os.environ, **(env or {})),
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        r = subprocess.CompletedProcess(argv, "hung", e.stdout or "", f"(still running after {timeout} s: killed)")
    return r, time.perf_counter() - t


def fixtures(w: str, corpus: str) -> dict[str, str]:
    """The scratch directory's files: a trained run, a damaged copy, exports, edited exports, odd files."""
    import pickle
    import shutil

    import torch

    f = {"corpus": corpus, "w": w}
    f["run"] = os.path.join(w, "run")
    r, _ = gptjax("train", "--config=tiny", f"--input={corpus}", f"--out_dir={f['run']}", "--max_iters=20")
    assert r.returncode == 0, r.stderr[-3000:]
    f["damaged"] = os.path.join(w, "damaged")
    shutil.copytree(f["run"], f["damaged"])
    best = [n for n in os.listdir(os.path.join(f["damaged"], "checkpoints")) if n.startswith("best_")][0]
    biggest = max((os.path.join(b, n) for b, _, ns in os.walk(os.path.join(f["damaged"], "checkpoints", best))
                   for n in ns), key=os.path.getsize)
    with open(biggest, "r+b") as fh:
        fh.truncate(os.path.getsize(biggest) // 2)
    os.makedirs(os.path.join(w, "nano"))
    f["pt"] = os.path.join(w, "nano", "ckpt.pt")
    r, _ = gptjax("export", f"--out_dir={f['run']}", "--to=nanogpt", f["pt"])
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(f["pt"], weights_only=True)
    for name, edit in (("iter_neg", {"iter_num": -5}),
                       ("dropout", {"model_args": {**ckpt["model_args"], "dropout": 1.5}}),
                       ("beta2", {"config": {**ckpt["config"], "beta2": 2.0}})):
        d = os.path.join(w, name)
        os.makedirs(d)
        shutil.copy(os.path.join(w, "nano", "meta.pkl"), d)
        torch.save({**ckpt, **edit}, os.path.join(d, "ckpt.pt"))
        f[name] = os.path.join(d, "ckpt.pt")
    f["meta_small"] = os.path.join(w, "meta_small.pkl")
    with open(f["meta_small"], "wb") as fh:
        pickle.dump({"vocab_size": 80, "itos": {i: chr(200 + i) for i in range(80)},
                     "stoi": {chr(200 + i): i for i in range(80)}}, fh)
    f["binary"] = os.path.join(w, "binary.bin")
    with open(f["binary"], "wb") as fh:
        fh.write(bytes(range(256)) * 8)
    f["empty"] = os.path.join(w, "empty.txt")
    open(f["empty"], "w").close()
    f["nonl"] = os.path.join(w, "no_newline.txt")
    with open(corpus, encoding="utf-8") as fh:
        text = fh.read()[:200_000].replace("\n", " ")
    with open(f["nonl"], "w", encoding="utf-8") as fh:
        fh.write(text)
    f["file"] = os.path.join(w, "a_file")
    with open(f["file"], "w") as fh:
        fh.write("not a directory\n")
    for name, body in (("syntax", "n_layer = 4\nbatch_size = (\n"), ("raises", "n_layer = 4\nx = 1 / 0\n"),
                       ("exits", "import sys\nsys.exit(3)\n"), ("unknown", "n_layers = 4\n"),
                       ("badvalue", "learning_rate = 'fast'\n")):
        f[f"cfg_{name}"] = os.path.join(w, f"cfg_{name}.py")
        with open(f[f"cfg_{name}"], "w") as fh:
            fh.write(body)
    f["foreign_tmp"] = os.path.join(w, "exp", "ckpt.pt.tmp")
    os.makedirs(os.path.dirname(f["foreign_tmp"]))
    with open(f["foreign_tmp"], "w") as fh:
        fh.write("somebody else's file\n")
    issue20_fixtures(f, text)
    return f


def _mount_tmpfs(path: str, options: str) -> bool:
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], capture_output=True).returncode == 0


def issue20_fixtures(f: dict, text: str) -> None:
    """Runs to replace with --force (one whose checkpoints are a link), damaged copies of the run, a prepared cache
    to damage, a corpus changed since its run, odd corpora, bad model factories, read-only and full mounts."""
    import pathlib
    import pickle
    import shutil

    w, run = f["w"], f["run"]

    def copy(name):
        shutil.copytree(run, os.path.join(w, name), symlinks=True)
        return os.path.join(w, name)

    f["force_run"] = copy("force_run")
    f["linked"] = copy("linked")
    shutil.move(os.path.join(f["linked"], "checkpoints"), os.path.join(w, "scratch"))
    os.symlink(os.path.join(w, "scratch"), os.path.join(f["linked"], "checkpoints"))
    for kind in DAMAGE:
        f[f"dmg_{kind}"] = copy(f"dmg_{kind}")
        damage_run(pathlib.Path(f[f"dmg_{kind}"]), kind)
    f["cachedata"] = os.path.join(w, "cachedata")
    r, _ = gptjax("prepare", "--config=tiny", f"--input={f['corpus']}", f"--data_dir={f['cachedata']}")
    assert r.returncode == 0, r.stderr[-3000:]
    prepared = os.path.join(f["cachedata"], "prepared")
    f["cache"] = os.path.join(prepared, os.listdir(prepared)[0])
    f["changed_corpus"] = os.path.join(w, "changed.txt")
    shutil.copy(f["corpus"], f["changed_corpus"])
    f["changed_run"] = copy("changed_run")
    config_path = os.path.join(f["changed_run"], "config.json")
    config = json.loads(pathlib.Path(config_path).read_text())
    config["data"]["input"] = f["changed_corpus"]
    pathlib.Path(config_path).write_text(json.dumps(config))
    with open(f["changed_corpus"], "a", encoding="utf-8") as fh:
        fh.write("\u20ac")
    f["one_char"] = os.path.join(w, "one_char.txt")
    pathlib.Path(f["one_char"]).write_text("a")
    f["bom"] = os.path.join(w, "bom.txt")
    pathlib.Path(f["bom"]).write_text("\ufeff" + text[:100_000], encoding="utf-8")
    f["mods"] = os.path.join(w, "mods")
    os.makedirs(f["mods"])
    pathlib.Path(f["mods"], "badfactories.py").write_text(
        "def returns_none(config, rngs):\n    return None\n\n\ndef returns_int(config, rngs):\n    return 3\n\n\n"
        "def raises(config, rngs):\n    return 1 / 0\n")
    pathlib.Path(f["mods"], "syntaxerr.py").write_text("def make(config, rngs)\n    pass\n")
    f["dir_pt"] = os.path.join(w, "dir.pt")
    os.makedirs(f["dir_pt"])

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {w}/pwned",)

    f["evil"] = os.path.join(w, "evil.pt")
    with open(f["evil"], "wb") as fh:
        pickle.dump({"model": RunsCode()}, fh)
    for mount, option in (("ro", "ro"), ("full", "size=64k")):  # a run whose checkpoints are on that mount
        f[mount], f[f"{mount}_run"] = os.path.join(w, mount), ""
        if _mount_tmpfs(f[mount], option):
            f[f"{mount}_run"] = copy(f"{mount}_run")
            shutil.rmtree(os.path.join(f[f"{mount}_run"], "checkpoints"))
            os.symlink(f[mount], os.path.join(f[f"{mount}_run"], "checkpoints"))


def unmount(f: dict) -> None:
    for key in ("ro", "full"):
        subprocess.run(["umount", f[key]], capture_output=True)


def cases(f: dict) -> list[tuple[str, list[str]]]:
    c, run, w = f["corpus"], f["run"], f["w"]
    tiny = ["--config=tiny", f"--input={c}"]
    new = f"--out_dir={w}/new"
    return [
        # prepare
        ("prepare", ["--dataset=wikipedia"]),
        ("prepare", ["--input=/no/such/file.txt"]),
        ("prepare", [f"--input={f['binary']}"]),
        ("prepare", [f"--input={f['empty']}"]),
        ("prepare", [f"--input={c}", "--tokenizer=bpe:10"]),
        ("prepare", [f"--input={c}", "--tokenizer=sentencepiece"]),
        ("prepare", [f"--config={f['cfg_syntax']}"]),
        ("prepare", [f"--config={f['cfg_raises']}"]),
        ("prepare", [f"--config={f['cfg_exits']}"]),
        ("prepare", [f"--config={f['cfg_unknown']}"]),
        ("prepare", [f"--config={f['cfg_badvalue']}"]),
        ("prepare", ["--config=shakespere"]),
        # train
        ("train", [*tiny, "--n_head=0", new]),
        ("train", [*tiny, "--n_head=5", new]),
        ("train", [*tiny, "--learning_rate=nan", new]),
        ("train", [*tiny, "--beta2=2", new]),
        ("train", [*tiny, "--grad_clip=-1", new]),
        ("train", [*tiny, "--dropout=1.5", new]),
        ("train", [*tiny, "--max_iters=abc", new]),
        ("train", [*tiny, "--keep_checkpoints=0", new]),
        ("train", [*tiny, "--n_layers=4", new]),
        ("train", [*tiny, "--block_size=1000000", new]),
        ("train", [*tiny, "--out_dir="]),
        ("train", [*tiny, f"--out_dir={f['file']}"]),
        ("train", [*tiny, "--out_dir=/proc/gptjax-run"]),
        ("train", [*tiny, f"--out_dir={run}"]),
        ("train", ["--init_from=resume", f"--out_dir={w}/nothing"]),
        ("train", ["--init_from=resume", f"--out_dir={run}", "--n_layer=8"]),
        ("train", ["--init_from=resume", f"--out_dir={run}", "--max_iters=5"]),
        ("train", [*tiny, "--batch_size=2147483647", new]),
        ("train", [*tiny, "--vocab_size=2000000000", new]),
        ("train", [*tiny, "--learning_rate=1e30", "--grad_clip=0", new]),
        ("train", [*tiny, "out-dir", new]),
        ("train", ["--config=tiny", f"--input={f['nonl']}", f"--out_dir={w}/nonl", "--max_iters=10"]),
        # sample
        ("sample", [f"--out_dir={run}", "--temperature=nan"]),
        ("sample", [f"--out_dir={run}", "--top_k=-1"]),
        ("sample", [f"--out_dir={run}", f"--start=FILE:{f['binary']}"]),
        ("sample", [f"--out_dir={run}", "--start=FILE:/no/such/prompt.txt"]),
        ("sample", [f"--out_dir={run}", "--start=\u20ac"]),
        ("sample", [f"--out_dir={run}", "--start="]),
        ("sample", [f"--out_dir={w}/nothing"]),
        ("sample", [f"--out_dir={f['damaged']}"]),
        ("sample", [f"--out_dir={run}", "--checkpoint=999"]),
        ("sample", [f"--out_dir={run}", "--checkpoint=newest"]),
        ("sample", [f"--out_dir={run}", "--temprature=0.5"]),
        # eval
        ("eval", [f"--out_dir={run}", "--batch_size=-1"]),
        ("eval", [f"--out_dir={run}", "--split=test"]),
        ("eval", [f"--out_dir={f['damaged']}"]),
        ("eval", [f"--out_dir={run}", f"--input={f['nonl']}"]),
        # bench
        ("bench", [*tiny, "--steps=0"]),
        ("bench", [*tiny, "--steps=-1"]),
        ("bench", [*tiny, "--modes=jax_jitt"]),
        ("bench", [*tiny, "--sweep=batch_size"]),
        # export
        ("export", [f"--out_dir={run}", "--to=nanogpt", f["pt"]]),
        ("export", [f"--out_dir={run}", "--to=onnx", f"{w}/x.pt"]),
        ("export", [f"--out_dir={run}", "--to=nanogpt"]),
        ("export", [f"--out_dir={f['damaged']}", "--to=nanogpt", f"{w}/d.pt"]),
        ("export", [f"--out_dir={run}", "--to=nanogpt", os.path.join(os.path.dirname(f["foreign_tmp"]), "ckpt.pt")]),
        ("train", ["--init_from=resume", f"--out_dir={f['damaged']}", "--max_iters=40"]),  # resumes from latest
        ("train", [*tiny, "--n_embd=32768", new]),
        # import
        ("import", ["--from=nanogpt", f["iter_neg"], f"--out_dir={w}/imp1"]),
        ("import", ["--from=nanogpt", f["dropout"], f"--out_dir={w}/imp2"]),
        ("import", ["--from=nanogpt", f["beta2"], f"--out_dir={w}/imp3"]),
        ("import", ["--from=nanogpt", f["pt"], f"--meta={f['meta_small']}", f"--out_dir={w}/imp4"]),
        ("import", ["--from=nanogpt", f["binary"], f"--out_dir={w}/imp5"]),
        ("import", ["--from=nanogpt", f["pt"]]),
        ("import", ["--from=nanogpt", f["pt"], f"--out_dir={run}"]),
    ] + issue20_cases(f)


def issue20_cases(f: dict) -> list[tuple]:
    """(command, args, extras): extras may hold env, timeout, setup (called first), cwd_deleted, section."""
    c, run, w = f["corpus"], f["run"], f["w"]
    tiny = ["--config=tiny", f"--input={c}"]
    mods = {"env": {"PYTHONPATH": f["mods"]}}
    out = []

    def add(section, command, args, **extras):
        out.append((command, args, {"section": section, **extras}))

    for bad in ("--input=/no/such.txt", "--mesh=dp:3", "--attention=cudnn", "--block_size=2000000"):
        add("data loss: --force with bad settings", "train", [*tiny, f"--out_dir={f['force_run']}", "--force", bad])
    add("data loss: --force with bad settings", "train", [*tiny, f"--out_dir={f['linked']}", "--force",
                                                         "--mesh=dp:3"])
    for kind in CACHE_DAMAGE:
        add(f"data loss: prepared cache, {kind}", "prepare",
            ["--config=tiny", f"--input={c}", f"--data_dir={f['cachedata']}"],
            setup=lambda kind=kind: CACHE_DAMAGE[kind](__import__("pathlib").Path(f["cache"])))
    add("hang", "train", [*tiny, f"--out_dir={w}/dist", "--distributed",
                          "--coordinator_address=no-such-host.invalid:1234", "--num_processes=1", "--process_id=0"],
        timeout=120)
    add("hang", "train", [*tiny, f"--out_dir={w}/dist", "--distributed", "--coordinator_address=127.0.0.1:23456",
                          "--num_processes=2", "--process_id=0", "--distributed_timeout=5"], timeout=120)
    add("hang", "train", [*tiny, f"--out_dir={w}/dist", "--distributed", "--coordinator_address=127.0.0.1:23457",
                          "--num_processes=2", "--process_id=1", "--distributed_timeout=5"], timeout=120)
    if f["ro_run"]:
        add("hang", "train", ["--init_from=resume", f"--out_dir={f['ro_run']}", "--max_iters=40"], timeout=120)
    add("hang", "sample", [f"--out_dir={run}", "--max_new_tokens=2147483647"], timeout=120)
    for kind, commands in DAMAGE.items():
        d = f[f"dmg_{kind}"]
        argv = {"sample": ["sample", f"--out_dir={d}", "--max_new_tokens=3"], "eval": ["eval", f"--out_dir={d}"],
                "export": ["export", f"--out_dir={d}", "--to=nanogpt", f"{w}/dmg_export/ckpt.pt"],
                "resume": ["train", "--init_from=resume", f"--out_dir={d}", "--max_iters=40"]}
        for command in commands:
            add(f"run files: {kind}", argv[command][0], argv[command][1:])
    for model in ("json:loads", "os:getcwd", ":f", "badfactories:returns_none", "badfactories:returns_int",
                  "badfactories:raises", "syntaxerr:make"):
        add("research API", "train", [*tiny, f"--out_dir={w}/model", f"--model={model}"], **mods)
    add("memory", "sample", [f"--out_dir={run}", "--num_samples=2147483647"])
    add("memory", "eval", [f"--out_dir={run}", "--batch_size=2147483647"])
    add("memory", "bench", [*tiny, "--modes=jax_jit", "--steps=2147483647"])
    add("memory", "bench", [*tiny, "--modes=jax_jit", "--repeats=2147483647"])
    add("paths", "bench", [*tiny, "--modes=jax_jit", "--steps=2", f"--out={f['file']}/sub"])
    add("paths", "bench", [*tiny, "--modes=jax_jit", "--steps=2", "--out=/proc/gptjax-bench"])
    add("paths", "export", [f"--out_dir={run}", "--to=nanogpt", f["dir_pt"]])
    add("paths", "export", [f"--out_dir={run}", "--to=nanogpt", f"{f['file']}/x.pt"])
    add("paths", "export", [f"--out_dir={run}", "--to=nanogpt", "/proc/x.pt"])
    if f["ro_run"]:
        add("paths", "export", [f"--out_dir={run}", "--to=nanogpt", f"{f['ro']}/x.pt"])
        add("paths", "bench", [*tiny, "--modes=jax_jit", "--steps=2", f"--out={f['ro']}/bench"])
    add("paths", "eval", [f"--out_dir={run}"], cwd_deleted=True)
    add("paths", "train", [*tiny, f"--out_dir={w}/dist", "--distributed", "--coordinator_address=127.0.0.1",
                           "--num_processes=1", "--process_id=0"])
    if f["full_run"]:
        add("paths", "train", ["--init_from=resume", f"--out_dir={f['full_run']}", "--max_iters=40"], timeout=300)
    add("silently wrong", "sample", [f"--out_dir={run}", "--temperature=1e-40", "--max_new_tokens=20"])
    add("silently wrong", "train", [*tiny, f"--out_dir={w}/dist", "--distributed",
                                    "--coordinator_address=127.0.0.1:99999", "--num_processes=1", "--process_id=0"])
    add("silently wrong", "train", [*tiny, f"--out_dir={w}/np0", "--num_processes=0"])
    add("silently wrong", "bench", [*tiny, "--mesh=dp:3", "--modes=jax_jit"])
    add("silently wrong", "train", ["--init_from=resume", f"--out_dir={f['changed_run']}", "--max_iters=40"])
    add("silently wrong", "eval", [f"--out_dir={f['changed_run']}"])
    add("silently wrong", "prepare", [f"--input={f['one_char']}", f"--data_dir={w}/small"])
    add("silently wrong", "prepare", [f"--input={f['bom']}", f"--data_dir={w}/small"])
    add("silently wrong", "prepare", ["--config=tiny", f"--input={c}", "--data_dir=~/data"],
        env={"HOME": f"{w}/home"})
    add("silently wrong", "prepare", ["--config=tiny", f"--input={c}"], env={"HOME": "", "GPTJAX_DATA_DIR": ""})
    add("silently wrong", "import", ["--from=nanogpt", f["dir_pt"], f"--out_dir={w}/imp6"])
    add("silently wrong", "import", ["--from=nanogpt", f["evil"], f"--out_dir={w}/imp7"])
    add("silently wrong", "import", ["--from=nanogpt", f["pt"], f"--meta={f['pt']}", f"--out_dir={w}/imp8"])
    for command in ("prepare", "train", "sample", "eval", "bench", "export", "import"):
        add("help", command, ["--help"])
    add("help", "--version", [])
    return out


def shown(stderr: str) -> list[str]:
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and not BAR.search(line)]


def main(argv=None) -> int:
    args = options(sys.argv[1:] if argv is None else argv, {
        "input": Option("PATH", None, "tiny Shakespeare's input.txt", required=True),
        "out": Option("PATH", os.path.join(ROOT, "experiments", "results", "reliability.md"), "the report"),
        "kills": Option("N", 10, "times a run is killed and resumed", None)}, "reliability.py", __doc__)
    corpus = os.path.abspath(args.input)
    env_data = tempfile.mkdtemp(prefix="gptjax-data-")
    os.environ["GPTJAX_DATA_DIR"] = env_data
    w = tempfile.mkdtemp(prefix="gptjax-rel-")
    f = fixtures(w, corpus)
    rows = []
    try:
        for case in cases(f):
            command, cargs, extras = (*case, {}) if len(case) == 2 else case
            if "setup" in extras:
                extras["setup"]()
            before = digest(w)
            r, secs = gptjax(command, *cargs, cwd=w, env=extras.get("env"), timeout=extras.get("timeout", 600),
                             cwd_deleted=extras.get("cwd_deleted", False))
            after = digest(w)
            changed = sorted(k for k in before if after.get(k) != before[k])
            created = sorted({k.split(os.sep)[0] for k in after if k not in before}) if r.returncode != 0 else []
            lines = shown(r.stderr)
            out_lines = [line for line in r.stdout.splitlines() if line.strip()]
            shown_out = out_lines[0 if {"--help", "--version"} & {command, *cargs} else -1] if out_lines else ""
            line = lines[-1] if lines else f"(stdout) {shown_out}" if shown_out else "(nothing on stderr)"
            env = " ".join(f"{k}={v}" for k, v in (extras.get("env") or {}).items())
            argv = (f"{env} " if env else "") + ("(cwd deleted) " if extras.get("cwd_deleted") else "") + \
                " ".join(["gptjax", command, *cargs])
            rows.append({"argv": argv.replace(w, "$W").replace(corpus, "$CORPUS"), "exit": r.returncode,
                         "line": line.replace(w, "$W"), "lines": len(lines), "traceback": "Traceback" in r.stderr,
                         "changed": changed, "created": created, "s": secs,
                         "section": extras.get("section", "bad inputs before issue 20")})
            print(f"[{r.returncode}] {rows[-1]['argv'][:90]}\n    {rows[-1]['line'][:160]}", flush=True)
    finally:
        unmount(f)
    crash_dir = os.path.join(w, "crashed")
    train_args = ["--config=tiny", f"--input={corpus}", "--max_iters=300", "--eval_interval=5", "--dropout=0.1"]
    straight = os.path.join(w, "straight")
    r, _ = gptjax("train", *train_args, f"--out_dir={straight}")
    assert r.returncode == 0, r.stderr[-3000:]
    log = crash_and_resume(train_args, crash_dir, kills=args.kills, seed=7)
    same_metrics = metrics(crash_dir) == metrics(straight)
    weights = _same_weights(crash_dir, straight)
    write(args.out, rows, log, same_metrics, weights, corpus)
    print(f"wrote {args.out}")
    return 0


def _same_weights(a: str, b: str) -> bool:
    import jax
    import numpy as np

    from gptjax import rundir

    la, lb = (jax.tree.leaves(rundir.load_state(d, "latest")[2]) for d in (a, b))
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def _paths(paths: list[str]) -> str:
    """Paths shortened to their first three parts, each once."""
    short = sorted({os.sep.join(p.split(os.sep)[:3]) for p in paths})
    return ", ".join(short) or "nothing"


def _cpu() -> str:
    """lscpu's model name, or the machine's architecture where it cannot be read."""
    import platform

    r = subprocess.run(["lscpu"], capture_output=True, text=True)
    model = [line.split(":", 1)[1].strip() for line in r.stdout.splitlines() if line.startswith("Model name")]
    return f"{model[0]}, {platform.machine()}" if model else platform.machine()


def write(path, rows, log, same_metrics, weights, corpus) -> None:

    import jax

    bad = [r for r in rows if r["exit"] not in (0, 2) or r["traceback"] or r["lines"] > 1
           or (r["exit"] != 0 and (r["changed"] or r["created"]))]
    lines = [
        "# Reliability: bad inputs and SIGKILL crashes",
        "",
        "Reproduce: `python experiments/reliability.py --input=PATH/tinyshakespeare/input.txt` "
        f"(here `--input=../shared/data/tinyshakespeare/input.txt`; {_cpu()}, jax {jax.__version__}, "
        f"{time.strftime('%Y-%m-%d')}).",
        "",
        f"## {len(rows)} bad or odd inputs",
        "",
        "Each row is one `gptjax` command run in a subprocess, in a scratch directory `$W` that holds a trained tiny "
        "run (`$W/run`), a copy with half of its best checkpoint's largest file cut off (`$W/damaged`), a nanoGPT "
        "export of the run (`$W/nano/ckpt.pt`), copies of it with edited fields, and the odd files named. "
        "`$CORPUS` is tiny Shakespeare. *Lines* counts what stderr showed besides the progress bar; *changed* "
        "lists files that existed before the command and differ after it; *left behind*, what a failed command "
        "created. Where nothing reached stderr, the first line of stdout is shown.",
        "",
        "Issue 20's cases follow the first table, one table per kind: `--force` on a run with bad new settings "
        "(`$W/force_run`, and `$W/linked`, whose `checkpoints` is a link to `$W/scratch`), a prepared cache "
        "damaged before each `prepare` (each is named on stderr and prepared again: exit 0, and the cache's files "
        "change back), waits that used to hang, copies of the run with one file damaged (`$W/dmg_*`), `--model` "
        "factories that are not ones (`$W/mods`), what cannot fit in memory, paths that cannot be written (`$W/ro` "
        "is a read-only tmpfs, `$W/full` a 64 KiB one), inputs that used to give a silently wrong result, and "
        "`--help`. The resume onto `$W/full` trains from step 0 (its checkpoints are on the empty disk), so as any "
        "resume it rewrites config.json and metrics.jsonl, then fails at its first save with the one line; its "
        "partial save in `$W/full` is removed by the next save: it is counted below though nothing was lost.",
        "",
        f"Commands that exited other than 0 or 2, printed a traceback or more than one line, or failed and changed "
        f"an existing file or left something behind: **{len(bad)}**. The commands that exit 0 are inputs that used "
        "to fail and now work: a char corpus without a newline trains and its closing sample starts from a "
        "character the vocabulary has; `export` beside somebody's `ckpt.pt.tmp` leaves that file alone; resuming a "
        "run whose best checkpoint is damaged goes on from its newest step checkpoint (and its new best replaces "
        "the damaged one).",
    ]
    i = 0
    for section in dict.fromkeys(r["section"] for r in rows):
        lines += ["", f"### {section}", "",
                  "| # | command | exit | what the user sees (last stderr line) | lines | traceback | changed | "
                  "left behind |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in (r for r in rows if r["section"] == section):
            i += 1
            line = r["line"].replace("|", "\\|")
            argv = r["argv"].replace("|", "\\|")
            lines.append(f"| {i} | `{argv}` | {r['exit']} | {line} | {r['lines']} | "
                         f"{'yes' if r['traceback'] else 'no'} | {_paths(r['changed'])} | "
                         f"{', '.join(r['created']) or 'nothing'} |")
    killed = [r for r in log if r["killed"]]
    lines += [
        "",
        "## SIGKILL at random moments, then the plain resume",
        "",
        "`tests/crashing.py`'s `crash_and_resume` (the suite's `test_sigkill_at_random_moments_then_resume_equals_an_"
        "uninterrupted_run` runs it too): `gptjax train --config=tiny --input=$CORPUS --max_iters=300 "
        "--eval_interval=5 --dropout=0.1 --out_dir=DIR`, killed with SIGKILL, then `gptjax train --init_from=resume "
        "--out_dir=DIR` again and again. The moments cycle: as soon as a checkpoint save is under way "
        "(`in_save`, once the process has committed a checkpoint of its own), a random time up to 0.3 s after the "
        "process committed a checkpoint (`mid_training`), and a random time up to 4 s after the process started "
        "(`from_start`: import, setup, restore, compile). *Inside save* means a temporary directory of a save that "
        "process began outlived it.",
        "",
        "| process | command | resumed from step | moment | killed | inside save | exit | checkpoints after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in log:
        lines.append(f"| {r['process']} | `{r['command']}` | {r['from_step']} | {r['kind']} | "
                     f"{'yes' if r['killed'] else 'no'} | "
                     f"{'yes' if r['inside_save'] else 'no'} | {r['exit']} | {', '.join(r['checkpoints_after'])} |")
    lines += [
        "",
        f"{len(killed)} kills ({sum(r['inside_save'] for r in killed)} inside a checkpoint save), "
        f"{len(log) - 1} resumes. Against an uninterrupted run of the same command: metrics.jsonl (without its "
        f"wall-clock columns) {'equal' if same_metrics else 'DIFFERENT'}; the final train state (weights, AdamW "
        f"moments, step, best loss) {'bit-identical' if weights else 'DIFFERENT'}.",
        "",
    ]
    extra = [r["process"] for r in log if sum(n.startswith("step_") for n in r["checkpoints_after"]) > 2]
    if extra:
        lines += [f"Process(es) {', '.join(map(str, extra))} died between committing a checkpoint and removing the "
                  "oldest, leaving one more than `--keep_checkpoints=2`; the next save removed it.", ""]
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
