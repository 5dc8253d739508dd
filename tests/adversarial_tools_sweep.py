#!/usr/bin/env python
"""Issue 21's adversarial sweep: bad flags, existing outputs, symbolic links and bad files against the
tools (train_tokenizer, convert_checkpoint, generate, evaluate), the launch examples and the run's
own --save checks, each classified by how it ended.

    python tests/adversarial_tools_sweep.py [--work-dir DIR]

Outcomes: `clear error` (exit status 1/2, one line naming the file or flag, nothing lost or left
behind), `correct` (it succeeds and its output is checked), and the failures we aim to have none of:
`traceback`, `silent wrong`, `loss` (a file the user had is changed or gone), `hang`, `false abort`
(a healthy request refused). Prints one line per case, then the counts as a JSON line. Not collected
by pytest (each class has its own test); a few minutes, most of it the one tiny training run.
"""
from __future__ import annotations

import gzip
import json
import os
import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.sweep_runner import run_sweep  # noqa: E402

SAMPLE = REPO / "data" / "sample" / "c4-train.00000-of-00001.json.gz"
BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": BIN + os.pathsep + os.environ["PATH"]}
CASES = []
SHARED: dict = {}  # built once: a checkpoint, its export, a tokenizer


def case(name):
    def register(fn):
        CASES.append((name, fn))
        return fn
    return register


def run(argv, timeout=300, env=None, cwd=REPO):
    """(exit status or 'hang', stdout, stderr)."""
    try:
        p = subprocess.run([str(a) for a in argv], env=env or ENV, capture_output=True, text=True, timeout=timeout,
                           cwd=cwd)
    except subprocess.TimeoutExpired:
        return "hang", "", ""
    return p.returncode, p.stdout, p.stderr


def tool(name, *argv, **kw):
    return run([sys.executable, REPO / "tools" / name, *argv], **kw)


def judged(result, expect, intact=True, tool_name=None):
    """A run that should fail with `expect` in its one-line message."""
    status, _, err = result
    if status == "hang":
        return "hang", "no exit within the timeout"
    if "Traceback" in err:
        return "traceback", err.strip().splitlines()[-1]
    lines = [line for line in err.strip().splitlines() if "[WARNING]" not in line and "Writing model shards" not in line]
    last = lines[-1] if lines else ""
    if status == 0:
        return "silent wrong", "exit status 0"
    if not intact:
        return "loss", last
    if status in (1, 2) and expect in last and (tool_name is None or last.startswith(f"{tool_name}: error")):
        return "clear error", last
    return "silent wrong", f"status {status}: {last}"


def correct(ok: bool, detail: str, failure="silent wrong"):
    return ("correct", detail) if ok else (failure, detail)


def listing(path: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# --- shared artefacts ------------------------------------------------------------------------------

def checkpoint(root: pathlib.Path) -> str:
    """A tiny 2-iteration checkpoint (iterations 1 and 2) with a SentencePiece tokenizer."""
    if "ckpt" not in SHARED:
        from tests.hf_support import build_checkpoints

        built = build_checkpoints(str(root / "shared"), {"run": ["--embedding-norm", "layernorm", "--save-interval", "1"]})
        SHARED["ckpt"] = built["run"].save_dir
    return SHARED["ckpt"]


def export(root: pathlib.Path) -> pathlib.Path:
    if "hf" not in SHARED:
        out = root / "shared" / "hf"
        status, _, err = tool("convert_checkpoint.py", "--to", "hf", "--load", checkpoint(root), "--output", out)
        assert status == 0, err
        SHARED["hf"] = out
    return SHARED["hf"]


def write_gz(path: pathlib.Path, content: bytes) -> pathlib.Path:
    with gzip.open(path, "wb") as f:
        f.write(content)
    return path


# --- train_tokenizer -------------------------------------------------------------------------------

def train_tokenizer(work, *extra, prefix="sp", vocab="400"):
    return tool("train_tokenizer.py", "--input", SAMPLE, "--model-prefix", work / prefix, "--vocab-size", vocab,
                "--workers", "1", *extra)


@case("train_tokenizer: --model-prefix of an existing tokenizer")
def _(work):
    train_tokenizer(work, vocab="600")
    before = (work / "sp.model").read_bytes()
    result = train_tokenizer(work)
    return judged(result, "already exists; pass --overwrite", (work / "sp.model").read_bytes() == before,
                  "train_tokenizer.py")


@case("train_tokenizer: --overwrite replaces it")
def _(work):
    import sentencepiece

    train_tokenizer(work, vocab="600")
    status, _, err = train_tokenizer(work, "--overwrite")
    size = sentencepiece.SentencePieceProcessor(model_file=str(work / "sp.model")).get_piece_size()
    return correct(status == 0 and size == 400 and listing(work) == ["sp.model", "sp.vocab"], f"{size} pieces")


@case("train_tokenizer: PREFIX.model is a directory")
def _(work):
    (work / "sp.model").mkdir()
    return judged(train_tokenizer(work), "sp.model already exists", (work / "sp.model").is_dir(), "train_tokenizer.py")


@case("train_tokenizer: an empty input file")
def _(work):
    (work / "empty.jsonl").write_bytes(b"")
    return judged(tool("train_tokenizer.py", "--input", work / "empty.jsonl", "--model-prefix", work / "sp",
                       "--vocab-size", "300"), "no text under --json-keys text", True, "train_tokenizer.py")


@case("train_tokenizer: a binary input file")
def _(work):
    (work / "bin.jsonl").write_bytes(os.urandom(20000))
    return judged(tool("train_tokenizer.py", "--input", work / "bin.jsonl", "--model-prefix", work / "sp",
                       "--vocab-size", "300"), "bin.jsonl:1", True, "train_tokenizer.py")


@case("train_tokenizer: a Latin-1 JSON-lines file")
def _(work):
    write_gz(work / "latin1.jsonl.gz", '{"text": "café crème"}\n'.encode("latin-1"))
    return judged(tool("train_tokenizer.py", "--input", work / "latin1.jsonl.gz", "--model-prefix", work / "sp",
                       "--vocab-size", "300"), "non_utf8: 1 (", True, "train_tokenizer.py")


@case("train_tokenizer: --vocab-size below the sample's characters")
def _(work):
    return judged(train_tokenizer(work, vocab="300"), "Vocabulary size is smaller than required_chars", True,
                  "train_tokenizer.py")


@case("train_tokenizer: --json-keys naming no key in the data")
def _(work):
    return judged(train_tokenizer(work, "--json-keys", "body"), "missing_key", True, "train_tokenizer.py")


@case("train_tokenizer: --input that does not exist")
def _(work):
    return judged(tool("train_tokenizer.py", "--input", work / "nope.jsonl", "--model-prefix", work / "sp"),
                  "no such file or directory", True, "train_tokenizer.py")


@case("train_tokenizer: --model-prefix inside a regular file")
def _(work):
    (work / "file").write_text("the user's")
    result = train_tokenizer(work, prefix="file/sp")
    return judged(result, "file", (work / "file").read_text() == "the user's", "train_tokenizer.py")


# --- convert_checkpoint --------------------------------------------------------------------------

def convert_to(work, output, root):
    return tool("convert_checkpoint.py", "--to", "hf", "--load", checkpoint(root), "--output", output)


@case("convert --to hf: OUTPUT.tmp holds the user's files")
def _(work):
    (work / "hf.tmp").mkdir()
    (work / "hf.tmp" / "notes.txt").write_text("the user's")
    status, _, err = convert_to(work, work / "hf", work.parent)
    kept = (work / "hf.tmp" / "notes.txt").read_text() == "the user's"
    if not kept:
        return "loss", "hf.tmp removed"
    return correct(status == 0 and (work / "hf" / "model.safetensors").exists(), "exported, hf.tmp kept")


@case("convert --to hf: published files' modes (umask 022)")
def _(work):
    out = export(work.parent)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    return correct(set(modes.values()) == {"0o644"}, str(modes))


for _target, _setup, _expect in (
        ("a regular file", lambda w: (w / "out").write_text("the user's"), "exists and is not a directory"),
        ("a symbolic link to a directory", lambda w: ((w / "real").mkdir(), (w / "out").symlink_to(w / "real")),
         "is a symbolic link"),
        ("a dangling symbolic link", lambda w: (w / "out").symlink_to(w / "nowhere"), "is a symbolic link"),
        ("a directory with a file", lambda w: ((w / "out").mkdir(), (w / "out" / "x").write_text("the user's")),
         "exists and is not empty"),
        ("a path under a regular file", lambda w: (w / "file").write_text("the user's"), "is not a directory")):
    @case(f"convert --to hf: --output is {_target}")
    def _(work, setup=_setup, expect=_expect, target=_target):
        setup(work)
        before = {p: (p.read_bytes() if p.is_file() and not p.is_symlink() else None) for p in work.rglob("*")}
        output = work / "file" / "hf" if "under" in target else work / "out"
        result = convert_to(work, output, work.parent)
        after = {p: (p.read_bytes() if p.is_file() and not p.is_symlink() else None) for p in work.rglob("*")}
        return judged(result, expect, before == after, "convert_checkpoint.py")


@case("convert --to hf: --output an empty directory")
def _(work):
    (work / "out").mkdir()
    status, _, err = convert_to(work, work / "out", work.parent)
    return correct(status == 0 and (work / "out" / "config.json").exists() and listing(work)[0] == "out",
                   err.strip().splitlines()[-1] if err.strip() else "", "false abort")


@case("convert --to hf: --load missing")
def _(work):
    return judged(tool("convert_checkpoint.py", "--to", "hf", "--load", work / "none", "--output", work / "o"),
                  "no such checkpoint directory", True, "convert_checkpoint.py")


@case("convert --from hf: --save holds a user's iter_0000000 (no latest)")
def _(work):
    (work / "ckpt" / "iter_0000000").mkdir(parents=True)
    (work / "ckpt" / "iter_0000000" / "mine.pt").write_text("the user's")
    result = tool("convert_checkpoint.py", "--from", "hf", "--input", export(work.parent), "--save", work / "ckpt")
    intact = listing(work / "ckpt") == ["iter_0000000", "iter_0000000/mine.pt"]
    return judged(result, "already exists; import into a new directory", intact, "convert_checkpoint.py")


@case("convert --from hf: --save holds a user's tokenizer/")
def _(work):
    (work / "ckpt" / "tokenizer").mkdir(parents=True)
    (work / "ckpt" / "tokenizer" / "tokenizer.json").write_text("the user's")
    result = tool("convert_checkpoint.py", "--from", "hf", "--input", export(work.parent), "--save", work / "ckpt")
    intact = (work / "ckpt" / "tokenizer" / "tokenizer.json").read_text() == "the user's"
    return judged(result, "tokenizer already exists", intact, "convert_checkpoint.py")


@case("convert --from hf: --input a directory that is not a model")
def _(work):
    (work / "notmodel").mkdir()
    return judged(tool("convert_checkpoint.py", "--from", "hf", "--input", work / "notmodel", "--save", work / "c"),
                  "config.json: no such file", True, "convert_checkpoint.py")


# --- generate / evaluate --------------------------------------------------------------------------

def generate(work, *argv):
    return tool("generate.py", "--load", checkpoint(work.parent), *argv)


def evaluate(work, *argv):
    return tool("evaluate.py", "--load", checkpoint(work.parent), *argv)


@case("generate: --max-new-tokens 1000000 past the context length")
def _(work):
    status, out, err = generate(work, "--prompt", "We the people", "--max-new-tokens", "1000000", "--greedy",
                                "--ignore-eod")
    result = json.loads(out.strip().splitlines()[-1]) if status == 0 else {}
    return correct(result.get("stopped_at_context_length") is True and "stopped after" in err,
                   f"{len(result.get('token_ids', []))} tokens, stopped_at_context_length")


for _name, _content, _expect in (("not UTF-8", b"We the people\nCaf\xe9\n", ":2: not UTF-8"),
                                 ("empty", b"", "no prompts in it"), ("only blank lines", b"\n \n", "no prompts in it")):
    @case(f"generate: --prompt-file {_name}")
    def _(work, content=_content, expect=_expect):
        (work / "prompts.txt").write_bytes(content)
        return judged(generate(work, "--prompt-file", work / "prompts.txt"), expect, True, "generate.py")


@case("generate: --prompt-file is a directory")
def _(work):
    return judged(generate(work, "--prompt-file", work), "--prompt-file", True, "generate.py")


@case("generate: --max-new-tokens 0")
def _(work):
    return judged(generate(work, "--prompt", "x", "--max-new-tokens", "0"), "--max-new-tokens must be >= 1", True,
                  "generate.py")


@case("evaluate: --jsonl not UTF-8 on line 3")
def _(work):
    (work / "d.jsonl").write_bytes(b'{"text": "a b c"}\n{"text": "d e f"}\n{"text": "caf\xe9"}\n')
    return judged(evaluate(work, "--jsonl", work / "d.jsonl"), "d.jsonl:3: not UTF-8", True, "evaluate.py")


@case("evaluate: --lambada a binary file")
def _(work):
    (work / "l.jsonl").write_bytes(b"\xff\xfe" + os.urandom(200))
    return judged(evaluate(work, "--lambada", work / "l.jsonl"), "l.jsonl:1: not UTF-8", True, "evaluate.py")


def dataset(work, documents=40):
    import numpy as np

    from megatron_snm.data.indexed_dataset import IndexedDatasetBuilder

    prefix = str(work / "d_text_document")
    builder = IndexedDatasetBuilder(prefix)
    rng = np.random.default_rng(0)
    for i in range(documents):
        builder.add_document(rng.integers(3, 400, 30 + i).tolist())
    builder.finalize()
    return prefix


@case("evaluate: --data-path scores the held-out documents by default")
def _(work):
    status, out, err = evaluate(work, "--data-path", dataset(work, 200))
    result = json.loads(out.strip().splitlines()[-1]) if status == 0 else {}
    return correct(result.get("documents") == [194, 200], f"documents {result.get('documents')} of 200 (969,30,1)")


@case("evaluate: --split not numbers")
def _(work):
    return judged(evaluate(work, "--data-path", dataset(work), "--split", "a,b"), "expected up to three numbers",
                  True, "evaluate.py")


@case("evaluate: --split 0,0,0")
def _(work):
    return judged(evaluate(work, "--data-path", dataset(work), "--split", "0,0,0"), "positive sum", True,
                  "evaluate.py")


@case("evaluate: --split-part test that is empty")
def _(work):
    return judged(evaluate(work, "--data-path", dataset(work), "--split-part", "test"),
                  "leaves the test part of the 40 documents empty", True, "evaluate.py")


@case("evaluate: --split-part that does not exist")
def _(work):
    return judged(evaluate(work, "--data-path", dataset(work), "--split-part", "heldout"), "invalid choice", True)


# --- the launch examples ----------------------------------------------------------------------------

def recording_env(work):
    bin_dir = work / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("deepspeed", "torchrun", "mpirun", "srun", "python", "sbatch", "scontrol"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{work / "calls"}"\n')
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(bin_dir / "python"),
            "DEEPSPEED": str(bin_dir / "deepspeed"), "HOSTFILE": str(REPO / "examples" / "hostfile.example"),
            "OUT": str(work / "out")}


for _script in ("pretrain_gpt_1.7b.sh", "pretrain_gpt_13b.sh", "pretrain_gpt_mpirun.sh", "pretrain_gpt_slurm.sbatch",
                "pretrain_gpt_tiny_cpu.sh"):
    @case(f"examples: {_script} --help")
    def _(work, script=_script):
        status, out, err = run(["bash", REPO / "examples" / script, "--help"], env=recording_env(work), cwd=work)
        launched = (work / "calls").exists()
        return correct(status == 0 and not launched and "DRY_RUN" in out,
                       "usage printed, nothing launched" if not launched else "LAUNCHED", "false abort" if status else
                       "silent wrong")


@case("examples: pretrain_gpt_350m.sh with a flag as its argument")
def _(work):
    result = run(["bash", REPO / "examples" / "pretrain_gpt_350m.sh", "--train-iters", "5"], env=recording_env(work),
                 cwd=work)
    return judged(result, "takes no arguments", not (work / "calls").exists())


@case("examples: tiny CPU DRY_RUN=1 over a previous run's checkpoints")
def _(work):
    env = recording_env(work)
    (work / "out" / "checkpoints").mkdir(parents=True)
    (work / "out" / "checkpoints" / "latest").write_text("iter_0000160")
    status, out, _ = run(["bash", REPO / "examples" / "pretrain_gpt_tiny_cpu.sh"], env={**env, "DRY_RUN": "1"})
    kept = (work / "out" / "checkpoints" / "latest").exists()
    if not kept:
        return "loss", "checkpoints deleted by a dry run"
    return correct(status == 0 and not (work / "calls").exists() and "--split 85,10,5" in out, "printed only")


@case("examples: the will-it-fit recipe, pasted")
def _(work):
    readme = (REPO / "examples" / "README.md").read_text()
    recipe = readme[readme.index("```bash", readme.index("## Memory: will it fit?")) + 7:]
    recipe = recipe[:recipe.index("```")]
    (work / "bin").mkdir()
    (work / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (work / "bin" / "python").chmod(0o755)
    status, out, err = run(["bash", "-c", recipe], env={**ENV, "PATH": f"{work / 'bin'}{os.pathsep}{ENV['PATH']}"})
    fits = status == 0 and json.loads(out.strip().splitlines()[-1]).get("fits") is True
    return correct(fits, "fits: true" if fits else err.strip()[-200:], "false abort")


# --- training: --save, precision, Megatron defaults -----------------------------------------------

@case("pretrain: --load-iteration 1 into the same --save that holds iteration 2")
def _(work):
    from tests.hf_support import train_runs

    shutil.copytree(checkpoint(work.parent), work / "ckpt")
    before = listing(work / "ckpt")
    flags = harness_flags(work) + ["--load", str(work / "ckpt"), "--save", str(work / "ckpt"), "--load-iteration", "1",
                                   "--train-iters", "3", "--save-interval", "1"]
    result, = train_runs([flags], 500)
    intact = listing(work / "ckpt") == before
    if not isinstance(result, Exception):
        return ("loss" if not intact else "silent wrong"), "trained over the newer checkpoint"
    message = str(result)
    ok = "--overwrite-newer-checkpoints" in message and "iteration 2" in message and intact
    return ("clear error", message) if ok else ("silent wrong", message)


def harness_flags(work):
    from tests.hf_support import BASE

    return BASE + ["--tokenizer-model", str(pathlib.Path(checkpoint(work.parent)).parent / "sp.model"),
                   "--embedding-norm", "layernorm"]


@case("pretrain: --fp16 on CPU")
def _(work):
    from megatron_snm.config import ConfigError, parse_args, resolve
    from megatron_snm.training.trainer import build_run

    try:
        build_run(resolve(parse_args(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                                      "--seq-length", "32", "--train-iters", "1", "--fp16"]), 1), 500)
    except ConfigError as err:
        return ("clear error", str(err)) if "--bf16" in str(err) else ("silent wrong", str(err))
    return "silent wrong", "accepted"


@case("pretrain: --save on a nearly full disk (units)")
def _(work):
    from megatron_snm.checkpoint.errors import CheckpointError
    from megatron_snm.checkpoint.save_dir import claim_save_dir

    free = shutil.disk_usage(work).free
    try:
        claim_save_dir(str(work / "ckpt"), None, free + 5 * 2**20)
    except CheckpointError as err:
        good = "0.00 GiB" not in str(err) and "(5.0 MiB more)" in str(err)
        return ("clear error", str(err)) if good else ("silent wrong", str(err))
    return "silent wrong", "accepted"


@case("pretrain: a Megatron script's unset dropout")
def _(work):
    from megatron_snm.config import parse_args, resolve

    notes = resolve(parse_args(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                                "--seq-length", "32", "--train-iters", "1"]), 1).notes
    line = next((n for n in notes if "--hidden-dropout 0.0 (Megatron-LM: 0.1)" in n), None)
    return correct(line is not None, line or str(notes))


def main() -> int:
    import torch  # noqa: F401  (before the extensions, as pytest does)

    os.umask(0o022)
    return run_sweep(CASES, __doc__.split("\n")[0], "tools_sweep_")


if __name__ == "__main__":
    sys.exit(main())
