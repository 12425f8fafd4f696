"""The public API as users see it: dir(), every lazy name resolves, errors all in normsurgeon.errors."""
import inspect

import normsurgeon
import normsurgeon.errors as errors


def test_dir_lists_every_lazy_name_and_each_resolves():
    names = [n for n in dir(normsurgeon) if not n.startswith("_")]
    for required in ("convert", "fold", "recalibrate", "evaluate", "export_onnx", "bench", "diagnose",
                     "load_model", "save_model", "NormSurgeonError", "ManifestError"):
        assert required in names
    for n in names:
        assert getattr(normsurgeon, n) is not None, n
    assert "importlib" not in names and "annotations" not in names


def test_every_error_class_lives_in_errors_and_is_exported():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, errors.NormSurgeonError)]
    assert len(classes) >= 15
    for c in classes:
        assert getattr(normsurgeon, c.__name__) is c
        assert c.exit_code in errors.EXIT_CODES.values() and c.exit_code not in (0, 1)
    import pathlib
    root = pathlib.Path(normsurgeon.__file__).parent
    for py in root.rglob("*.py"):  # no error class of a user's making defined anywhere else
        if py.name != "errors.py":
            text = py.read_text()
            assert "(NormSurgeonError):" not in text and "(ModelSpecError):" not in text, py


def test_every_verb_result_has_report_and_to_json(tmp_path):
    import json

    m = normsurgeon.load_model("normsurgeon:digits_cnn")
    shape = (2, 1, 16, 16)
    results = [normsurgeon.convert(m, "gn", input_shape=shape), normsurgeon.fold(m, input_shape=shape),
               normsurgeon.inspect(m, input_shape=shape),
               normsurgeon.export_onnx(m, tmp_path / "m.onnx", input_shape=(1, 1, 16, 16)),
               normsurgeon.bench(tmp_path / "m.onnx", provider="cpu", batch_sizes=[1], runs=1, warmup=0)]
    for r in results:
        assert isinstance(r.report, dict) and json.loads(r.to_json()) == json.loads(json.dumps(r.report, default=str))
