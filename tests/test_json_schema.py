"""Every verb's --json against the schema in docs/json.md: the envelope, each verb's fields, and
snake_case keys everywhere except the documented data maps."""
import json
import re

import pytest

from tests.security.files import MODEL, cli

SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")
DATA_MAPS = {"summary", "counts", "nodes", "nodes_before", "nodes_after"}
WRITERS = {"output", "path", "changes", "summary", "verification", "info"}
FIELDS = {
    "inspect": {"model", "traceable", "path", "input_shape", "layers", "recipe", "counts", "recipes"},
    "convert": WRITERS, "fold": WRITERS, "equalize": WRITERS, "recalibrate": WRITERS,
    "evaluate": {"data", "samples", "accuracy", "loss", "correct", "noise", "noise_seed"},
    "export": {"output", "exporter", "opset", "input_shape", "dynamic_batch", "nodes", "batchnorm_nodes",
               "checker", "bytes", "seconds", "verification"},
    "bench": {"provider", "precision", "input_shape", "rows", "ratios", "environment", "notes"},
    "diagnose": {"model", "data", "samples", "thresholds", "summary", "layers"},
    "distill": {"output", "steps", "seconds", "stages", "before", "after", "teacher_accuracy"},
    "recipes": {"recipes"},
}


def bad_keys(obj, path=""):
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not SNAKE.match(str(k)):
                out.append(f"{path}.{k}")
            if k not in DATA_MAPS:
                out += bad_keys(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for v in obj:
            out += bad_keys(v, path + "[]")
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    w = tmp_path_factory.mktemp("json")
    shape = ["--input-shape", "2,1,16,16"]
    runs = {
        "inspect": ["inspect", MODEL, *shape],
        "convert": ["convert", MODEL, "--to", "gn+ws", "-o", str(w / "c.pt"), *shape],
        "fold": ["fold", str(w / "c.pt"), "-o", str(w / "f.pt")],
        "equalize": ["equalize", MODEL, "-o", str(w / "e.pt"), *shape],
        "recalibrate": ["recalibrate", MODEL, "--data", "digits:train", "--samples", "64", "-o", str(w / "r.pt")],
        "evaluate": ["evaluate", str(w / "r.pt"), "--data", "digits:test", "--samples", "64"],
        "export": ["export", str(w / "f.pt"), "-o", str(w / "f.onnx"), "--verify"],
        "bench": ["bench", str(w / "f.onnx"), "--runs", "2", "--warmup", "0", "--batch-size", "1", "--no-torch"],
        "diagnose": ["diagnose", MODEL, "--data", "digits:test", "--samples", "32"],
        "distill": ["distill", str(w / "c.pt"), "--teacher", MODEL, "--data", "digits:test", "--steps", "3",
                    "--batch-size", "32", "-o", str(w / "d.pt")],
        "recipes": ["recipes"],
    }
    got = {}
    for verb, argv in runs.items():
        code, out, err = cli([*argv, "--json"])
        assert code == 0, (verb, err)
        got[verb] = json.loads(out)  # exactly one object: json.loads refuses anything after it
    return got


@pytest.mark.parametrize("verb", sorted(FIELDS))
def test_verb_json_follows_the_schema(outputs, verb):
    d = outputs[verb]
    assert list(d)[:2] == ["schema_version", "verb"] and d["schema_version"] == 1 and d["verb"] == verb
    missing = FIELDS[verb] - set(d)
    assert not missing, missing
    assert not bad_keys(d), bad_keys(d)
    if verb in ("convert", "fold", "equalize", "recalibrate"):
        assert d["output"].endswith(".pt") and isinstance(d["changes"], list)
        assert all(set(c) == {"target", "action", "before", "after", "detail"} for c in d["changes"])
        assert sum(d["summary"].values()) == len(d["changes"])


def test_the_key_check_can_fail():
    assert bad_keys({"a": {"Fold seconds": 1}, "summary": {"Kept": 1}, "l": [{"badKey": 0}]}) == \
        [".a.Fold seconds", ".l[].badKey"]
