"""MIL models, their registry and MILConfig: the shared interface, checked on every model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from wsi_ssl.errors import ConfigError
from wsi_ssl.mil import MILConfig, create_model, list_models, register_model
from wsi_ssl.mil.config import BUILTIN_MODELS
from wsi_ssl.mil.models import ABMIL, GatedAttention, MeanPoolMIL, MILModel, Standardized
from wsi_ssl.mil.models.standardize import feature_stats

SMALL = MILConfig(hidden_dim=32, attention_dim=16, n_heads=4, dropout=0.0)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_builtin_models_are_registered() -> None:
    assert set(BUILTIN_MODELS) - {"retrieval"} <= set(list_models())


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_every_model_shares_the_interface(name: str, n: int) -> None:
    model = create_model(name, 24, 3, SMALL)
    assert isinstance(model, MILModel) and (model.in_dim, model.n_classes) == (24, 3)
    bag = torch.randn(n, 24)
    logits, attention = model(bag)
    assert logits.shape == (3,)
    if name == "meanpool":  # weighs no tile above another
        assert attention is None
    else:
        assert attention.shape == (n,) and torch.all(attention >= 0)
        assert attention.sum().item() == pytest.approx(1.0, abs=1e-5)
    logits.sum().backward()  # every parameter that shapes the output gets a gradient
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    probs, att = model.predict(bag.numpy().astype(np.float16))
    assert probs.shape == (3,) and probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert (att is None) if name == "meanpool" else att.shape == (n,)


@pytest.mark.parametrize("cls", [ABMIL, MeanPoolMIL])
def test_pooling_models_are_permutation_invariant(cls: type[MILModel]) -> None:
    model = cls(16, 2).eval()
    bag = torch.randn(30, 16)
    perm = torch.randperm(30)
    logits, att = model(bag)
    logits_p, att_p = model(bag[perm])
    torch.testing.assert_close(logits, logits_p, rtol=1e-5, atol=1e-6)
    if att is not None:  # mean pooling has none
        torch.testing.assert_close(att[perm], att_p, rtol=1e-5, atol=1e-6)


def test_gated_attention_matches_ilse_equation_9() -> None:
    """a_k = softmax_k(w^T (tanh(V h_k) * sigm(U h_k))), written out by hand."""
    att = GatedAttention(8, 5).eval()
    h = torch.randn(11, 8)
    V, bV = att.V.weight, att.V.bias
    U, bU = att.U.weight, att.U.bias
    w, bw = att.w.weight[0], att.w.bias[0]
    scores = torch.stack(
        [w @ (torch.tanh(V @ hk + bV) * torch.sigmoid(U @ hk + bU)) + bw for hk in h]
    )
    expected = torch.exp(scores) / torch.exp(scores).sum()
    torch.testing.assert_close(att(h), expected)
    # and ABMIL pools with exactly those weights
    model = ABMIL(8, 2, hidden_dim=8, attention_dim=5, dropout=0.0).eval()
    logits, a = model(h)
    z = (a[:, None] * model.project(h)).sum(0)
    torch.testing.assert_close(logits, model.classifier(z))


def test_transmil_attention_folds_padding_back_onto_tiles() -> None:
    model = create_model("transmil", 12, 2, SMALL).eval()
    for n in (2, 3, 5, 10, 17):  # 17 -> 5x5 grid: 8 padding copies
        _, att = model(torch.randn(n, 12))
        assert att.shape == (n,) and att.sum().item() == pytest.approx(1.0, abs=1e-5)
    # 17 tiles on a 5 x 5 grid: tiles 0..7 are repeated as padding, so each of them gets its
    # own weight plus its copy's; 8..16 only their own (the class token's row, tile by tile)
    bag = torch.randn(17, 12)
    captured = {}

    def grab(module: torch.nn.Module, inputs: object, output: tuple) -> None:
        captured["w"] = output[1]

    hook = model.layers[-1].register_forward_hook(grab)
    _, att = model(bag)
    hook.remove()
    row = captured["w"][0, 1:]  # over the class token and 25 grid tokens; drop the class token
    folded = row[:17].clone()
    folded[:8] += row[17:25]
    torch.testing.assert_close(att, folded / folded.sum(), rtol=1e-5, atol=1e-6)


def test_meanpool_weighs_no_tile() -> None:
    """Mean pooling returns no attention (a uniform one drew flat heatmaps and arbitrary
    galleries); its logits are the classifier of the mean projected tile."""
    model = MeanPoolMIL(4, 2, dropout=0.0).eval()
    bag = torch.randn(8, 4)
    logits, att = model(bag)
    assert att is None
    torch.testing.assert_close(logits, model.classifier(model.project(bag).mean(0)))
    probs, weights = model.predict(bag.numpy())
    assert weights is None and probs.shape == (2,)
    assert probs.sum() == pytest.approx(1.0, abs=1e-6)


def test_standardized_applies_training_statistics() -> None:
    rng = np.random.default_rng(0)
    bags = [rng.normal(5.0, 0.01, size=(n, 6)).astype(np.float32) for n in (10, 20)]
    mean, std = feature_stats(bags)
    all_tiles = np.concatenate(bags)
    np.testing.assert_allclose(mean, all_tiles.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, all_tiles.std(0), rtol=1e-3)
    inner = MeanPoolMIL(6, 2, hidden_dim=4, dropout=0.0)
    model = Standardized(inner, mean, std).eval()
    x = torch.from_numpy(bags[0])
    torch.testing.assert_close(model(x)[0], inner((x - model.mean) / model.std)[0])
    state = model.state_dict()
    assert {"mean", "std"} <= set(state)  # saved with the checkpoint
    constant = Standardized(MeanPoolMIL(2, 2), np.zeros(2), np.zeros(2))
    assert torch.isfinite(constant(torch.zeros(3, 2))[0]).all()


def test_register_a_model() -> None:
    @register_model("test-maxpool")
    def maxpool(in_dim: int, n_classes: int, config: MILConfig) -> MILModel:
        return MeanPoolMIL(in_dim, n_classes, config.hidden_dim)

    assert "test-maxpool" in list_models()
    assert MILConfig(model="test-maxpool").model == "test-maxpool"
    with pytest.raises(ConfigError, match="already registered"):
        register_model("abmil")(maxpool)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("model", "clam", "valid: .*abmil"),
        ("folds", 1, "folds"),
        ("monitor", "recall", "monitor must be one of"),
        ("balance", "oversample", "balance must be one of"),
        ("val_fraction", 0.6, "val_fraction"),
        ("max_tiles", 0, "max_tiles"),
        ("dropout", 1.0, "dropout"),
        ("lr", 0.0, "lr"),
        ("threads", 0, "threads"),
    ],
)
def test_config_rejects_bad_values(field: str, value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MILConfig(**{field: value})


def test_config_round_trips() -> None:
    config = MILConfig(model="transmil", folds=3, max_tiles=None, threads=1)
    assert MILConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown MILConfig keys"):
        MILConfig.from_dict({**config.to_dict(), "gamma": 1})


def test_importing_mil_config_and_cli_loads_no_torch() -> None:
    code = (
        "import sys, argparse\n"
        "import wsi_ssl.mil, wsi_ssl.mil.config\n"
        "from wsi_ssl.cli import mil\n"
        "p = argparse.ArgumentParser(); mil.register(p.add_subparsers())\n"
        "print('torch' in sys.modules, 'faiss' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_nystrom_attention_approximates_softmax_attention() -> None:
    import math

    from wsi_ssl.mil.models.transmil import TransLayer, nystrom_attention

    q, k, v = (0.5 * torch.randn(1, 2, 64, 8) for _ in range(3))
    exact = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    # as many landmarks as tokens: the approximation is exact up to the pseudo-inverse
    out, row = nystrom_attention(q, k, v, 64, cls_row=True)
    torch.testing.assert_close(out, exact @ v, atol=0.03, rtol=0)
    torch.testing.assert_close(row, exact[:, :, 0], atol=0.01, rtol=0)
    # a sequence that is not a multiple of the landmarks is padded and unpadded
    out, row = nystrom_attention(q[:, :, :50], k[:, :, :50], v[:, :, :50], 8, cls_row=True)
    assert out.shape == (1, 2, 50, 8) and row.shape == (1, 2, 50)
    # a layer switches to Nystrom above 16 x landmarks tokens and still returns weights
    layer = TransLayer(16, 2, dropout=0.0, landmarks=4).eval()
    for n in (40, 100):
        y, w = layer(torch.randn(1, n, 16), cls_attention=True)
        assert y.shape == (1, n, 16) and w.shape == (1, n)
        assert w.sum().item() == pytest.approx(1.0, abs=1e-5) and (w >= 0).all()
