"""DATA specs and their checks (API level; the CLI's behaviour is in test_recalibrate_cli.py)."""
import numpy as np
import pytest
import torch
from PIL import Image

from normsurgeon.calibrate.data import load_data, load_digits
from normsurgeon.errors import DataError


def test_digits_is_16x16_real_data_with_a_fixed_disjoint_split():
    from sklearn.datasets import load_digits as sk

    d = load_digits()
    assert d.x.shape == (1797, 1, 16, 16) and d.y.shape == (1797,)
    ref = torch.nn.functional.interpolate(torch.from_numpy(sk().images[:1] / 16.0).float().unsqueeze(1), size=16,
                                          mode="bilinear", align_corners=False)
    torch.testing.assert_close(d.x[:1], ref)
    tr, te = load_digits("train"), load_digits("test")
    assert len(tr) + len(te) == 1797 and len(te) == 359
    assert not set(map(bytes, te.x[:20].numpy())) & set(map(bytes, tr.x.numpy()))


def test_npz_and_pt(tmp_path):
    x = np.random.default_rng(0).standard_normal((5, 2, 3, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(5))
    d = load_data(tmp_path / "d.npz")
    assert torch.equal(d.x, torch.from_numpy(x)) and d.y.tolist() == [0, 1, 2, 3, 4]
    torch.save({"x": torch.from_numpy(x)}, tmp_path / "d.pt")
    assert not load_data(tmp_path / "d.pt").has_labels


def test_image_folder(tmp_path):
    for cls, shade in (("a", 10), ("b", 200)):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((12, 10, 3), shade + i, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    d = load_data(tmp_path, image_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x, y = d.take(torch.arange(4))
    assert x.shape == (4, 3, 8, 8) and y.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(x[0, 0, 0, 0], torch.tensor((10 / 255 - 0.5) / 0.25))
    g = load_data(tmp_path, image_size=8, mean=(0.5,), std=(0.5,))
    assert g.take(torch.arange(1))[0].shape == (1, 1, 8, 8)


@pytest.mark.parametrize("x, y, match", [
    (np.zeros((4, 2, 3, 3), np.float32) + np.nan, None, "NaN/Inf"),
    (np.full((4, 2, 3, 3), np.inf, np.float32), None, "NaN/Inf"),
    (np.zeros((4,), np.float32), None, "shape"),
    (np.zeros((4, 2, 3, 3), np.uint8), None, "floating-point"),
    (np.zeros((0, 2, 3, 3), np.float32), None, "no samples"),
    (np.zeros((4, 2, 3, 3), np.float32), np.zeros(3, np.int64), "one class index"),
])
def test_bad_arrays(tmp_path, x, y, match):
    kw = {"x": x} if y is None else {"x": x, "y": y}
    np.savez(tmp_path / "d.npz", **kw)
    with pytest.raises(DataError, match=match):
        load_data(tmp_path / "d.npz")


def test_bad_specs(tmp_path):
    with pytest.raises(DataError, match="no images"):
        load_data(tmp_path)
    np.savez(tmp_path / "w.npz", inputs=np.zeros((2, 1)))
    with pytest.raises(DataError, match="no array 'x'"):
        load_data(tmp_path / "w.npz")
    with pytest.raises(DataError, match="not found"):
        load_data(tmp_path / "missing.npz")
    with pytest.raises(DataError, match="image folders only"):
        load_data("digits", image_size=32)


def test_a_dataloader_is_data_for_recalibrate_and_evaluate():
    """Any iterable of batches works as data in Python: the result equals the same tensors given
    directly (an independent path), and bad batches are one clear DataError."""
    import pytest
    from torch.utils.data import DataLoader, TensorDataset

    import normsurgeon
    from normsurgeon.calibrate.data import load_digits
    from normsurgeon.errors import DataError

    d = load_digits("test")
    loader = DataLoader(TensorDataset(d.x, d.y), batch_size=50, shuffle=False)
    model = normsurgeon.load_model("normsurgeon:digits_cnn")
    a = normsurgeon.recalibrate(model, loader, batch_size=32).model
    b = normsurgeon.recalibrate(model, (d.x, d.y), batch_size=32).model
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    ev = normsurgeon.evaluate(a, ({"x": x, "y": y} for x, y in loader))
    direct = normsurgeon.evaluate(a, (d.x, d.y))
    assert ev["samples"] == len(d) and ev["data"] == "batches"
    assert {k: v for k, v in ev.items() if k != "data"} == {k: v for k, v in direct.items() if k != "data"}
    with pytest.raises(DataError, match="label every batch or none"):
        normsurgeon.evaluate(a, iter([(d.x[:4], d.y[:4]), d.x[4:8]]))
    with pytest.raises(DataError, match="no batches"):
        normsurgeon.recalibrate(model, iter([]))
