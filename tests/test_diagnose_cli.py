"""``normsurgeon diagnose`` through the real CLI: JSON, table width, PNG/HTML files that open, atomic
writes, and one ``error:`` line for every bad input."""
import base64
import html.parser
import io
import json
import os

import pytest
import torch

import normsurgeon as ns
from normsurgeon.calibrate.digits_cnn import digits_cnn
from tests.util import assert_one_error_line, run_cli

SPEC = "normsurgeon:digits_cnn"
ARGS = ("--data", "digits:test", "--samples", "64")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    m = digits_cnn()
    from normsurgeon import provenance

    provenance.set_source(m, SPEC)
    path = tmp_path_factory.mktemp("m") / "cnn.pt"
    ns.save_model(m.eval(), path)
    return str(path)


class Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.imgs, self.scripts, self.heads, self._in_body_row = 0, [], 0, [], False
        self._tag = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._tag = tag
        if tag == "tr":
            self.rows += 1
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "script":
            self.scripts += 1
            assert "src" not in a  # inline only: opens with no server and no network

    def handle_data(self, data):
        if self._tag == "th" and data.strip():
            self.heads.append(data.strip())


def decode_png(data: bytes):
    import matplotlib.image

    img = matplotlib.image.imread(io.BytesIO(data), format="png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    try:
        from PIL import Image
    except ImportError:
        return img
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    return img


def test_json_png_and_html(model_file, tmp_path):
    png, page = tmp_path / "d.png", tmp_path / "d.html"
    p = run_cli("diagnose", model_file, *ARGS, "--teacher", model_file, "--json", "--plot", str(png),
                "--html", str(page), cwd=tmp_path, real=True)
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert [r["name"] for r in rep["layers"]] == ["1", "5", "9"]
    assert all(r["verdict"] in ("ok", "recalibrate", "collapsed", "dead", "diverged") for r in rep["layers"])
    assert all(r["cka"] == pytest.approx(1.0, abs=1e-6) for r in rep["layers"])  # the model is its own teacher
    assert rep["samples"] == 64 and rep["plot"] == str(png) and rep["html"] == str(page)
    decode_png(png.read_bytes())
    parser = Page()
    parser.feed(page.read_text(encoding="utf-8"))
    assert parser.rows == 1 + 3 and parser.scripts == 1 and parser.heads[:3] == ["#", "layer", "norm"]
    (src,) = parser.imgs
    assert src.startswith("data:image/png;base64,")
    decode_png(base64.b64decode(src.split(",", 1)[1]))
    assert sorted(os.listdir(tmp_path)) == ["d.html", "d.png"]  # no temporary files left


def test_table_fits_80_columns(model_file, tmp_path):
    p = run_cli("diagnose", model_file, *ARGS, "--teacher", model_file, cwd=tmp_path, env={"COLUMNS": "80"})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    assert sum(1 for ln in lines if ln.strip().split(" ")[0] in ("1", "5", "9")) == 3
    assert "cka" in p.stdout and p.stderr == ""  # no progress bar when stderr is not a terminal


@pytest.mark.slow
def test_existing_output_needs_force_and_is_replaced_atomically(model_file, tmp_path):
    png = tmp_path / "d.png"
    png.write_bytes(b"old")
    p = run_cli("diagnose", model_file, *ARGS, "--plot", str(png), cwd=tmp_path)
    assert_one_error_line(p, "--force")
    assert png.read_bytes() == b"old"
    p = run_cli("diagnose", model_file, *ARGS, "--plot", str(png), "--force", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    decode_png(png.read_bytes())


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    from normsurgeon.diagnosis.html import write_html

    r = ns.diagnose(digits_cnn().eval(), torch.rand(8, 1, 16, 16))
    out = tmp_path / "r.html"
    out.write_text("old")

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        write_html(r, out)
    assert out.read_text() == "old" and os.listdir(tmp_path) == ["r.html"]


def test_missing_matplotlib_is_one_error_line(model_file, tmp_path):
    fake = tmp_path / "fake"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    work = tmp_path / "w"
    work.mkdir()
    from tests.util import ROOT

    p = run_cli("diagnose", model_file, *ARGS, "--html", "r.html", cwd=work,
                env={"PYTHONPATH": f"{fake}{os.pathsep}{ROOT}"})
    assert_one_error_line(p, "pip install 'normsurgeon[plot]'")
    assert os.listdir(work) == []


SLOW = pytest.mark.slow  # each case is one CLI process (~3-6 s of torch import on a busy machine)
BAD = [
    pytest.param(("--noise", "gauss:0.1"), "weight:ETA", id="noise"),
    pytest.param(("--noise-seed", "3"), "--noise-seed needs --noise", id="seed", marks=SLOW),
    pytest.param(("--noise", "weight:0.1", "--noise-samples", "2"), "--noise-samples", id="samples", marks=SLOW),
    pytest.param(("--plot", "out.jpg"), "*.png", id="plot-suffix"),
    pytest.param(("--html", "nofolder/out.htm"), "*.html", id="html-suffix", marks=SLOW),
    pytest.param(("--samples", "0"), "--samples", id="zero-samples", marks=SLOW),
    pytest.param(("--teacher", "missing/teacher.pt"), "not found", id="teacher", marks=SLOW),
]


@pytest.mark.parametrize("extra,needle", BAD)
def test_bad_options_one_error_line_nothing_written(model_file, tmp_path, extra, needle):
    p = run_cli("diagnose", model_file, *ARGS, *extra, "--plot", "ok.png", cwd=tmp_path) if "--plot" not in extra \
        else run_cli("diagnose", model_file, *ARGS, *extra, cwd=tmp_path)
    assert_one_error_line(p, needle)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("model,data,needle", [
    pytest.param(SPEC, "nowhere.npz", "DATA not found", marks=SLOW),
    ("torch.nn:Identity", "digits:test", "no normalization layer"),
    pytest.param("torchvision:resnet18", "digits:test", "3", marks=SLOW),
    pytest.param("missing.pt", "digits:test", "not found", marks=SLOW),
])
def test_bad_model_or_data_one_error_line(tmp_path, model, data, needle):
    p = run_cli("diagnose", model, "--data", data, "--samples", "8", "--html", "r.html", cwd=tmp_path)
    assert_one_error_line(p, needle)
    assert os.listdir(tmp_path) == []
