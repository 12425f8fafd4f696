"""Inputs whose activations cannot fit are refused up front, with an estimate that matches a direct
count of the activations."""
import pytest
import torch
import torchvision


from normsurgeon.errors import EnvironmentProblem
from normsurgeon.graph.memory import activation_bytes, check_fits


def test_estimate_counts_every_leaf_output():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 10 * 10, 5))
    got = activation_bytes(model, (2, 3, 10, 10))
    direct = 4 * (2 * 8 * 100 * 3 + 2 * 800 + 2 * 5 + 2 * 3 * 100)  # conv, bn, relu, flatten, linear, input
    assert got == direct


def test_huge_input_refused_with_estimate_before_any_forward():
    model = torchvision.models.resnet18(weights=None)
    with pytest.raises(EnvironmentProblem, match=r"needs about [0-9.]+ GiB .* available"):
        check_fits(model, (4096, 3, 1024, 1024))
    assert check_fits(model, (1, 3, 64, 64)) < 2**30
    with pytest.raises(EnvironmentProblem):
        check_fits(model, (2, 3, 224, 224), available=10 * 2**20)  # a machine with 10 MiB free


def test_model_that_cannot_run_on_meta_gets_no_estimate():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x if float(x.sum()) > 0 else -x

    assert activation_bytes(DataDependent(), (2, 3)) is None
    assert check_fits(DataDependent(), (2, 3), available=1) is None


def test_cli_refuses_a_giant_input_shape(tmp_path):
    from tests.security.files import cli, one_error_line

    code, _, err = cli(["convert", "torchvision:resnet18", "--to", "gn", "-o", str(tmp_path / "x.pt"),
                        "--input-shape", "100000,3,2048,2048"])
    assert code == 4
    one_error_line(err, "GiB", "--input-shape")
    assert list(tmp_path.iterdir()) == []
