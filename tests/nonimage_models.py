"""Small non-image models for tests/test_non_image_inputs.py: sequences (N, C, L), raw audio (N, L),
tables (N, F) and volumes (N, C, D, H, W), each with BatchNorm. Importable as a MODEL factory spec."""
from torch import nn


class Seq1d(nn.Module):  # (N, C, L)
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(4, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(),
                                  nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, x, embed=False):
        y = self.body(x).mean(-1)
        return y if embed else self.fc(y)


class Wave(nn.Module):  # (N, L) raw audio
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(1, 8, 9, stride=4, padding=4), nn.BatchNorm1d(8), nn.ReLU(),
                                  nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU())
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.body(x.unsqueeze(1)).amax(-1))


class Tab(nn.Module):  # (N, F)
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16),
                                 nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x):
        return self.net(x)


class Vol(nn.Module):  # (N, C, D, H, W)
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
                                 nn.Conv3d(8, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


def seq1d():
    return Seq1d()


def wave():
    return Wave()


def tab():
    return Tab()


def vol():
    return Vol()
