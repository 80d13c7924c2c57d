import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class TinyTransformer(nn.Module):
    """Embedding + one encoder layer + mean pool + head; takes HF-style keyword inputs."""

    def __init__(self, vocab: int = 20, dim: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.enc = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask):
        h = self.enc(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def make_mlp(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, classes)).double().eval()


def make_cnn(classes: int = 3) -> nn.Module:
    torch.manual_seed(1)
    m = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, classes),
    ).double()
    # non-trivial running statistics, as a pre-trained network would have
    m[1].running_mean.uniform_(-0.5, 0.5)
    m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


def make_transformer() -> nn.Module:
    torch.manual_seed(2)
    return TinyTransformer().double().eval()


@pytest.fixture
def mlp_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, generator=g, dtype=torch.double)
    return x, torch.randint(0, 3, (7,), generator=g)


@pytest.fixture
def cnn_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.double)
    return x, torch.randint(0, 3, (6,), generator=g)


@pytest.fixture
def text_data():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 20, (5, 6), generator=g)
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (5,), generator=g)


def split_settings(lr, settings):
    """Old-style flat settings -> ``(tl.SGD(lr, ...), forecast keyword options)``: momentum,
    weight_decay and decay_to go to the optimizer, target_scale into ``tl.MSE``."""
    from tangentlab.training import MSE, SGD

    rest = dict(settings)
    opt = SGD(lr, **{k: rest.pop(k) for k in ("momentum", "weight_decay", "decay_to") if k in rest})
    if "target_scale" in rest:
        scale = rest.pop("target_scale")
        if rest.get("loss", "mse") == "mse":
            rest["loss"] = MSE(scale)
    return opt, rest
