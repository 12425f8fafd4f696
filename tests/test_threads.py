"""--threads: the verbs that compute on data run with the asked torch thread count and give the
caller's count back; a bad count is one error line before anything is loaded or written."""
import numpy as np
import pytest
import torch

import normsurgeon
from normsurgeon.calibrate.digits_cnn import train_digits_cnn
from normsurgeon.errors import ModelSpecError
from normsurgeon.model_io import save_model
from normsurgeon.threads import torch_threads
from tests.util import assert_one_error_line, run_cli


def test_context_sets_and_restores():
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    with torch_threads(want):
        assert torch.get_num_threads() == want
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(want):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with torch_threads(np.int64(want)):  # an integer scalar from numpy is a count too
        assert torch.get_num_threads() == want
    for bad in (0, -1, 1.5, True, "2", np.int64(0)):
        with pytest.raises(ModelSpecError, match="--threads"), torch_threads(bad):
            pass


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("threads")
    teacher = train_digits_cnn(0)  # a rebuildable source, so the files are weights-only
    save_model(teacher, d / "teacher.pt")
    save_model(normsurgeon.convert(teacher, to="gn", input_shape=(2, 1, 16, 16)).model, d / "student.pt")
    return d


VERBS = {
    "distill": ("normsurgeon.distillation.api", "distill",
                lambda d, out: ["distill", str(d / "student.pt"), "--teacher", str(d / "teacher.pt"), "--data",
                                "digits:test", "--steps", "2", "--batch-size", "16", "-o", str(out)]),
    "recalibrate": ("normsurgeon.calibrate.recalibrate", "recalibrate",
                    lambda d, out: ["recalibrate", str(d / "teacher.pt"), "--data", "digits:test", "--samples", "64",
                                    "-o", str(out)]),
    "evaluate": ("normsurgeon.calibrate.evaluate", "evaluate",
                 lambda d, out: ["evaluate", str(d / "teacher.pt"), "--data", "digits:test", "--samples", "64"]),
    "diagnose": ("normsurgeon.diagnosis", "diagnose",
                 lambda d, out: ["diagnose", str(d / "teacher.pt"), "--data", "digits:test", "--samples", "64"]),
}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_verb_runs_with_the_asked_threads(models, tmp_path, monkeypatch, verb):
    import importlib

    module, name, argv = VERBS[verb]
    mod = importlib.import_module(module)
    real, seen = getattr(mod, name), []

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, name, spy)
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    out = tmp_path / "out.pt"
    r = run_cli(*argv(models, out), "--threads", str(want))
    assert r.returncode == 0, r.stderr
    assert seen == [want]
    assert torch.get_num_threads() == before  # the caller's setting is back


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_bad_thread_count_is_one_error_line(models, tmp_path, verb):
    out = tmp_path / "out.pt"
    r = run_cli(*VERBS[verb][2](models, out), "--threads", "0")
    assert r.returncode == 2
    assert_one_error_line(r, "--threads 0")
    assert list(tmp_path.iterdir()) == []
