"""A bounded argv fuzzer over every verb and flag, in-process through the real command line.

Each case is drawn by a seeded rule from per-verb grammars of valid and invalid values. A case fails
on: an exception escaping the CLI, a traceback or "internal error" in its output, an exit code
outside the table (0 ok, 2 input, 3 verification, 4 environment; 1 is a bug), a hang (alarm), or a
file written by a failed command. At least half the cases must get past argument parsing.
"""
from __future__ import annotations

import random
import shutil
import signal
from pathlib import Path

import pytest

from tests.security.files import MODEL, cli

CASES = 300
SEED = 20261202
CASE_SECONDS = 180

MODELS = ["@model", "@model", "@file", "@file", "nosuch.pt", "nosuchmod_q:build", "torchvision:nosuchnet",
          "@dir", "@text", "timm:hf-hub:x/y", "json:loads", ""]
SHAPES = ["2,1,16,16", "1,1,12,12", "2,1,16", "abc", "0,1,16,16", "-1", "", "1,3,16,16"]
INTS = ["1", "4", "0", "-3", "x", "1.5", "100000000000"]
FLOATS = ["0.1", "1", "0", "-1", "nan", "inf", "x"]
DATA = ["digits:test", "digits:test", "digits", "digits:val", "nosuch.npz", "@text", "@dir"]

GRAMMAR: dict[str, dict] = {
    "inspect": {"out": None, "opts": {"--to": ["gn+ws", "gn:4", "nope", "gn:0"], "--input-shape": SHAPES,
                                      "--json": None, "--weights": ["@text", "nosuch.pt"]}},
    "convert": {"out": ".pt", "opts": {"--to": ["gn+ws", "ln", "frozen", "gn:4", "ln+pn", "bcn", "zz", "gn:-2"],
                                       "--input-shape": SHAPES, "--keep": ["features.*", "nomatch*"],
                                       "--layer": ["*=ln", "bad", "*=zz"], "--ws-form": ["var", "std", "q"],
                                       "--verify": None, "--init": ["revisited", "odd"], "--input-norm": None,
                                       "--json": None, "--force": None}},
    "fold": {"out": ".pt", "opts": {"--input-shape": SHAPES, "--keep": ["*", "nomatch*"], "--verify": None,
                                    "--json": None, "--force": None}},
    "equalize": {"out": ".pt", "opts": {"--iters": INTS, "--c": FLOATS, "--verify": None, "--json": None,
                                        "--input-shape": SHAPES}},
    "recalibrate": {"out": ".pt", "opts": {"--data": DATA, "--batches": INTS, "--samples": INTS,
                                           "--batch-size": INTS, "--noise": ["weight:0.05", "weight:x", "bogus"],
                                           "--noise-mode": ["fixed", "resample", "odd"], "--noise-seed": INTS,
                                           "--noise-samples": INTS, "--verify": None, "--json": None},
                    "base": ["--data", "digits:test", "--samples", "64"]},
    "evaluate": {"out": None, "opts": {"--data": DATA, "--batch-size": INTS, "--samples": INTS,
                                       "--noise": ["weight:0.05", "nope"], "--noise-seed": INTS, "--json": None},
                 "base": ["--data", "digits:test", "--samples", "64"]},
    "export": {"out": ".onnx", "opts": {"--opset": ["17", "20", "3", "x"], "--input-shape": SHAPES,
                                        "--dynamic-batch": None, "--no-fold": None, "--verify": None,
                                        "--exporter": ["auto", "bogus"], "--channel-affine": ["conv", "zzz"],
                                        "--json": None},
               "weight": 0.5},
    "bench": {"out": None, "opts": {"--provider": ["cpu", "auto", "tpu"], "--batch-size": ["1", "0", "a,b"],
                                    "--runs": INTS, "--warmup": INTS, "--threads": INTS, "--input-shape": SHAPES,
                                    "--no-torch": None, "--json": None},
              "base": ["--runs", "2", "--warmup", "0", "--batch-size", "1", "--no-torch"], "weight": 0.4},
}
OUTPUTS = ["@new", "@new", "@new", "@exists", "@wrongsuffix", "@underfile", "@newdir"]


def _case(rng: random.Random, i: int) -> tuple[str, list[str]]:
    verbs = list(GRAMMAR)
    verb = rng.choices(verbs, weights=[GRAMMAR[v].get("weight", 1.0) for v in verbs])[0]
    g = GRAMMAR[verb]
    argv = [verb, rng.choice(MODELS)]
    if g["out"] is not None and rng.random() < 0.95:
        kind = rng.choice(OUTPUTS)
        name = {"@new": f"out{i}{g['out']}", "@exists": "@existing" + g["out"],
                "@wrongsuffix": f"out{i}{'.pt' if g['out'] == '.onnx' else '.onnx'}",
                "@underfile": f"@text/out{i}{g['out']}", "@newdir": f"sub{i}/out{i}{g['out']}"}[kind]
        argv += ["-o", name]
    argv += g.get("base", [])
    for flag in rng.sample(list(g["opts"]), k=min(len(g["opts"]), rng.randint(0, 3))):
        values = g["opts"][flag]
        argv += [flag] if values is None else [flag, rng.choice(values)]
    if rng.random() < 0.05:
        argv.append(rng.choice(["--bogus", "--trust-code", "--trust-pickle", "extra-arg"]))
    return verb, argv


def _resolve(argv: list[str], fixtures: dict[str, str]) -> list[str]:
    out = []
    for a in argv:
        for key, value in fixtures.items():
            a = a.replace(key, value)
        out.append(a)
    return out


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


@pytest.mark.slow
def test_cli_fuzz(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    model_file = work / "model.pt"
    code, _, err = cli(["convert", MODEL, "--to", "gn+ws", "-o", str(model_file), "--input-shape", "2,1,16,16"])
    assert code == 0, err
    (work / "notes.txt").write_text("not a model\n")
    (work / "adir").mkdir()
    fixtures = {"@existing": str(work / "existing"), "@model": MODEL, "@file": str(model_file),
                "@dir": str(work / "adir"), "@text": str(work / "notes.txt")}
    for suffix in (".pt", ".onnx"):
        (work / f"existing{suffix}").write_bytes(b"keep me")

    rng = random.Random(SEED)
    previous = signal.signal(signal.SIGALRM, _alarm)
    past_parsing, failures, codes = 0, [], {}
    try:
        for i in range(CASES):
            verb, argv = _case(rng, i)
            argv = _resolve(argv, fixtures)
            before = _listing(work)
            signal.alarm(CASE_SECONDS)
            try:
                code, out, err = cli(argv, cwd=work)
            except _Hang:
                failures.append(f"hang: {argv}")
                continue
            except BaseException as e:  # noqa: BLE001 - anything escaping the CLI is a failure
                failures.append(f"escaped {type(e).__name__}: {e}: {argv}")
                continue
            finally:
                signal.alarm(0)
            codes[code] = codes.get(code, 0) + 1
            text = out + err
            if code not in (0, 2, 3, 4) or "Traceback" in text or "internal error" in text:
                failures.append(f"exit {code}: {argv}: {err.strip()[:300]}")
            if code != 0 and _listing(work) != before:
                failures.append(f"wrote on failure: {argv}: {sorted(_listing(work) - before)}")
            if code != 0:
                lines = [ln for ln in err.splitlines() if ln.strip()]
                if len(lines) != 1 or not lines[0].startswith("error: "):
                    failures.append(f"not one error line: {argv}: {err.strip()[:300]}")
            if not (code == 2 and "--help')" in err):
                past_parsing += 1
            for p in work.iterdir():  # outputs of successful cases go, so later cases start the same
                if p.name.startswith(("out", "sub")):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert not failures, "\n".join(failures[:20])
    assert past_parsing >= CASES // 2, (past_parsing, codes)
    assert codes.get(0, 0) >= CASES // 20, codes  # the grammar also produces commands that work
