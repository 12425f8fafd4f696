"""MODEL specs, weights files, manifests that rebuild without unpickling, and the pickle opt-in."""
from __future__ import annotations

import os
import sys
import textwrap

import pytest
import torch
from torch import nn

import normsurgeon
from normsurgeon.errors import ModelSpecError, OutputExistsError, UntrustedPickleError
from tests.util import randomize_norm_stats

X = torch.randn(2, 3, 32, 32)


def out(model, x=X):
    with torch.no_grad():
        return model.eval()(x)


def test_torchvision_and_timm_specs_build_random_init_models():
    m = normsurgeon.load_model("torchvision:resnet18")
    assert type(m).__name__ == "ResNet" and not m.training
    pytest.importorskip("timm")
    t = normsurgeon.load_model("timm:resnet10t")
    assert type(t).__name__ == "ResNet" and t.pretrained_cfg["architecture"] == "resnet10t"


@pytest.mark.parametrize("spec,msg", [
    ("torchvision:no_such_net", "unknown torchvision model"),
    ("timm:no_such_net", "unknown timm model"),
    ("nomodule_xyz:build", "cannot import"),
    ("missing/file.pt", "not found"),
    ("justaword", "cannot read MODEL"),
])
def test_bad_specs_raise_one_line_errors(spec, msg):
    with pytest.raises(ModelSpecError, match=msg) as e:
        normsurgeon.load_model(spec)
    assert "\n" not in str(e.value)


@pytest.fixture
def factory_dir(tmp_path, monkeypatch):
    """A user module in the current directory providing a factory."""
    (tmp_path / "mynets_ns_test.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def small():
            torch.manual_seed(3)
            return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(8, 2))

        not_callable = 3
    """))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("mynets_ns_test", None)


def test_factory_spec_from_cwd(factory_dir):
    m = normsurgeon.load_model("mynets_ns_test:small")
    assert isinstance(m[1], nn.BatchNorm2d)
    with pytest.raises(ModelSpecError, match="no callable"):
        normsurgeon.load_model("mynets_ns_test:not_callable")
    with pytest.raises(ModelSpecError, match="no callable"):
        normsurgeon.load_model("mynets_ns_test:absent")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_file_loads_into_the_spec(tmp_path, suffix):
    src = randomize_norm_stats(normsurgeon.load_model("torchvision:resnet18"), seed=5)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(src.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    m = normsurgeon.load_model("torchvision:resnet18", weights=path)
    torch.testing.assert_close(out(m), out(src), rtol=0, atol=0)


def test_weights_for_another_architecture_are_a_clean_error(tmp_path):
    torch.save(normsurgeon.load_model("torchvision:resnet18").state_dict(), tmp_path / "r18.pt")
    with pytest.raises(ModelSpecError, match="missing"):
        normsurgeon.load_model("torchvision:resnet34", weights=tmp_path / "r18.pt")
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18_10.pt")
    with pytest.raises(ModelSpecError, match="size mismatch for fc.weight"):
        normsurgeon.load_model("torchvision:resnet18", weights=tmp_path / "r18_10.pt")


def _refuse_unpickling(monkeypatch):
    """Make any full unpickle fail loudly: manifests must load weights-only."""
    real = torch.load

    def guarded(*a, **k):
        assert k.get("weights_only") is True, "normsurgeon tried to unpickle a manifest"
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", guarded)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_manifest_round_trip_without_trust_pickle(tmp_path, monkeypatch, suffix):
    model = randomize_norm_stats(normsurgeon.load_model("torchvision:resnet18"))
    r = normsurgeon.convert(model, "gn+ws", input_shape=(2, 3, 32, 32), layers={"layer4.*": "gn:8"},
                            keep=["layer1.0.*"])
    path = normsurgeon.save_model(r.model, tmp_path / f"conv{suffix}")
    _refuse_unpickling(monkeypatch)
    back = normsurgeon.load_model(str(path))
    torch.testing.assert_close(out(back), out(r.model), rtol=0, atol=0)
    assert back.get_submodule("layer4.0.bn1").num_groups == 8
    assert isinstance(back.get_submodule("layer1.0.bn1"), nn.BatchNorm2d)
    assert type(back.conv1).__name__ == "WSConv2d"


def test_convert_chain_through_files(tmp_path, monkeypatch):
    """convert -> save -> load -> convert -> save -> load: each step replays, nothing unpickled."""
    model = randomize_norm_stats(normsurgeon.load_model("torchvision:resnet18"))
    first = normsurgeon.convert(model, "frozen", input_shape=(2, 3, 32, 32), keep=["layer4.*"])
    p1 = normsurgeon.save_model(first.model, tmp_path / "a.pt")
    _refuse_unpickling(monkeypatch)
    loaded = normsurgeon.load_model(str(p1))
    second = normsurgeon.convert(loaded, "gn:16", input_shape=(2, 3, 32, 32))
    assert sorted(c.target for c in second.changes if c.action == "replaced") == sorted(
        c.target for c in first.changes if c.action == "kept")
    p2 = normsurgeon.save_model(second.model, tmp_path / "b.safetensors")
    back = normsurgeon.load_model(str(p2))
    torch.testing.assert_close(out(back), out(second.model), rtol=0, atol=0)
    steps = [s["verb"] for s in back._normsurgeon_provenance["steps"]]
    assert steps == ["convert", "convert"]


def test_full_pickle_refused_then_accepted(tmp_path):
    model = randomize_norm_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    path = tmp_path / "full.pt"
    torch.save(model, path)
    with pytest.raises(UntrustedPickleError, match="--trust-pickle"):
        normsurgeon.load_model(str(path))
    m = normsurgeon.load_model(str(path), trust_pickle=True)
    torch.testing.assert_close(out(m), out(model), rtol=0, atol=0)
    # a model not built from a spec saves as a full pickle, which again needs the opt-in
    r = normsurgeon.convert(m, "frozen", input_shape=(2, 3, 32, 32))
    p2 = normsurgeon.save_model(r.model, tmp_path / "conv.pt")
    with pytest.raises(UntrustedPickleError):
        normsurgeon.load_model(str(p2))
    torch.testing.assert_close(out(normsurgeon.load_model(str(p2), trust_pickle=True)), out(model),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelSpecError, match="safetensors"):
        normsurgeon.save_model(r.model, tmp_path / "conv.safetensors")
    assert not (tmp_path / "conv.safetensors").exists()


def test_state_dict_or_bare_tensors_as_model_say_use_weights(tmp_path):
    m = normsurgeon.load_model("torchvision:resnet18")
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "sd.safetensors"))
    for name in ("sd.pt", "sd.safetensors"):
        with pytest.raises(ModelSpecError, match="--weights"):
            normsurgeon.load_model(str(tmp_path / name))


@pytest.mark.parametrize("content", [b"", b"not a torch file" * 10])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_corrupt_files(tmp_path, content, suffix):
    p = tmp_path / f"bad{suffix}"
    p.write_bytes(content)
    with pytest.raises(ModelSpecError, match="cannot read"):
        normsurgeon.load_model(str(p))


def test_save_is_atomic_and_respects_force(tmp_path):
    m = normsurgeon.load_model("torchvision:resnet18")
    p = normsurgeon.save_model(m, tmp_path / "m.pt")
    stamp = os.stat(p).st_mtime_ns
    with pytest.raises(OutputExistsError, match="--force"):
        normsurgeon.save_model(m, p)
    assert os.stat(p).st_mtime_ns == stamp
    normsurgeon.save_model(m, p, force=True)

    class Boom(RuntimeError):
        pass

    def explode(*a, **k):
        raise Boom("disk full")

    import normsurgeon.model_io as mio

    orig = torch.save
    torch.save = explode
    try:
        with pytest.raises(Boom):
            mio.save_model(m, tmp_path / "n.pt")
    finally:
        torch.save = orig
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.pt"]  # no partial or temp file left
    # a missing output folder (and its parents) is created
    out = normsurgeon.save_model(m, tmp_path / "nodir" / "deeper" / "x.pt")
    assert out.is_file() and sorted(x.name for x in out.parent.iterdir()) == ["x.pt"]
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputExistsError, match="is a file, not a folder"):
        normsurgeon.save_model(m, tmp_path / "afile" / "x.pt")
