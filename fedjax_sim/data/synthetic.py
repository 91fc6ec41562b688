"""Synthetic(alpha, beta) federated data from FedProx.

Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith, "Federated Optimization in Heterogeneous
Networks", MLSys 2020 (https://arxiv.org/abs/1812.06127), Section 5.1, reproduced draw for draw
from their ``generate_synthetic`` script.

Generative model for ``K = num_clients`` devices, ``d = dim`` features and ``C = num_classes``
classes (every normal below is parameterised by its standard deviation, as in NumPy):

* size of device ``k``: ``n_k = int(LogNormal(4, 2)) + 50``;
* model heterogeneity: ``u_k ~ N(0, alpha)``, ``W_k[i, c] ~ N(u_k, 1)``, ``b_k[c] ~ N(u_k, 1)``;
* data heterogeneity: ``B_k ~ N(0, beta)``, ``v_k[j] ~ N(B_k, 1)``;
* features ``x ~ N(v_k, Sigma)`` with diagonal ``Sigma_jj = j ** -1.2`` (``j = 1..d``);
* labels ``y = argmax(softmax(x W_k + b_k))``.

Synthetic-IID (``iid=True``) instead sets ``v_k = B_k * ones`` (all zeros when ``beta = 0``) and
labels every device with one shared ``W ~ N(0, 1)``, ``b ~ N(0, 1)``.

Every draw comes from one ``np.random.RandomState(seed)`` in the order of the original script:
all ``n_k``; all ``u_k``; all ``B_k``; every ``v_k`` (nothing is drawn for Synthetic-IID);
for Synthetic-IID the shared ``W`` then ``b``; then per device ``W_k``, ``b_k`` (drawn even in
the IID case, where they are discarded, so the streams line up) and its features. Each device is
then shuffled and split into its first ``int(0.9 * n_k)`` examples for training and the rest for
testing, as FedProx did; the shuffles (one permutation per device, in device order) continue the
same stream rather than Python's ``random`` module that the original used.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from fedjax_sim.data.federated import FederatedData, FederatedDataset

__all__ = ["synthetic", "synthetic_iid"]

# FedProx's fixed constants.
_SIZE_LOG_MEAN = 4.0
_SIZE_LOG_STD = 2.0
_MIN_SIZE = 50
_COV_EXPONENT = -1.2
_TRAIN_FRACTION = 0.9


def synthetic(
    alpha: float,
    beta: float,
    *,
    iid: bool = False,
    num_clients: int = 30,
    dim: int = 60,
    num_classes: int = 10,
    seed: int,
) -> FederatedData:
    """FedProx's Synthetic(alpha, beta) (or Synthetic-IID) federated classification data.

    Args:
      alpha: standard deviation of ``u_k``, the per-device mean of the labelling model's weights;
        controls how much the local models differ.
      beta: standard deviation of ``B_k``, the per-device mean of the feature means ``v_k``;
        controls how much the local feature distributions differ.
      iid: generate Synthetic-IID: one shared labelling model and ``v_k = B_k * ones``.
      num_clients: number of devices (30 in the paper).
      dim: feature dimension (60 in the paper).
      num_classes: number of classes (10 in the paper).
      seed: seed of the single ``np.random.RandomState`` all draws come from.

    Returns:
      A ``FederatedData`` whose clients ``f_00000, f_00001, ...`` hold ``x`` (float32,
      ``[n, dim]``) and ``y`` (int32, ``[n]``), split 90/10 per client into ``train`` and ``test``.

    Raises:
      ValueError: for a negative or non-finite ``alpha``/``beta``, fewer than one client, a
        non-positive ``dim`` or fewer than two classes.
    """
    _check_args(alpha, beta, num_clients, dim, num_classes, seed)
    rs = np.random.RandomState(seed)

    sizes = rs.lognormal(_SIZE_LOG_MEAN, _SIZE_LOG_STD, num_clients).astype(int) + _MIN_SIZE
    mean_w = rs.normal(0.0, alpha, num_clients)
    mean_b = mean_w  # FedProx ties b's prior mean to W's: the same u_k.
    feature_shift = rs.normal(0.0, beta, num_clients)
    cov = np.diag(np.arange(1, dim + 1, dtype=np.float64) ** _COV_EXPONENT)

    mean_x = np.zeros((num_clients, dim))
    for k in range(num_clients):
        if iid:
            mean_x[k] = np.ones(dim) * feature_shift[k]
        else:
            mean_x[k] = rs.normal(feature_shift[k], 1.0, dim)

    if iid:
        w_global = rs.normal(0.0, 1.0, (dim, num_classes))
        b_global = rs.normal(0.0, 1.0, num_classes)

    xs, ys = [], []
    for k in range(num_clients):
        # Drawn even for Synthetic-IID, where they are overwritten, to keep FedProx's stream.
        w = rs.normal(mean_w[k], 1.0, (dim, num_classes))
        b = rs.normal(mean_b[k], 1.0, num_classes)
        if iid:
            w, b = w_global, b_global
        x = rs.multivariate_normal(mean_x[k], cov, int(sizes[k]))
        # argmax of the logits equals FedProx's argmax of softmax(logits) (softmax is monotone);
        # labels come from the float64 features, before the float32 cast, as in the original.
        xs.append(x.astype(np.float32))
        ys.append(np.argmax(x @ w + b, axis=1).astype(np.int32))

    width = max(5, len(str(num_clients - 1)))
    train, test = {}, {}
    for k in range(num_clients):
        cid = f"f_{k:0{width}d}"
        order = rs.permutation(int(sizes[k]))
        train_len = int(_TRAIN_FRACTION * int(sizes[k]))
        train[cid] = {"x": xs[k][order[:train_len]], "y": ys[k][order[:train_len]]}
        test[cid] = {"x": xs[k][order[train_len:]], "y": ys[k][order[train_len:]]}

    name = _name(alpha, beta, iid)
    return FederatedData(
        train=FederatedDataset(train, name=f"{name}/train"),
        test=FederatedDataset(test, name=f"{name}/test"),
        num_classes=num_classes,
    )


def synthetic_iid(
    *, num_clients: int = 30, dim: int = 60, num_classes: int = 10, seed: int
) -> FederatedData:
    """FedProx's Synthetic-IID: ``synthetic(0, 0, iid=True, ...)``.

    Every device draws features from ``N(0, Sigma)`` and is labelled by one shared model
    ``W ~ N(0, 1)``, ``b ~ N(0, 1)``; only the device sizes differ. See ``synthetic`` for the
    arguments and the returned value.
    """
    return synthetic(
        0.0, 0.0, iid=True, num_clients=num_clients, dim=dim, num_classes=num_classes, seed=seed
    )


def _check_args(alpha, beta, num_clients, dim, num_classes, seed) -> None:
    for label, value in (("alpha", alpha), ("beta", beta)):
        if not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(
                f"synthetic: {label} is a standard deviation and must be a finite number >= 0, "
                f"got {value!r}."
            )
    for label, value, least in (
        ("num_clients", num_clients, 1),
        ("dim", dim, 1),
        ("num_classes", num_classes, 2),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"synthetic: {label} must be an integer >= {least}, got {value!r}.")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise ValueError(
            f"synthetic: seed must be an integer in [0, 2**32) for np.random.RandomState, "
            f"got {seed!r}."
        )


def _name(alpha: float, beta: float, iid: bool) -> str:
    if iid:
        return "synthetic_iid" if alpha == 0 and beta == 0 else f"synthetic_iid({alpha:g},{beta:g})"
    return f"synthetic({alpha:g},{beta:g})"
