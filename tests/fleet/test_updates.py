"""Update validation, clipping, noise, FedAvg / FedSA and the DP accountant (numpy only, fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pocketpeft.errors import AdapterShapeError, BaseModelMismatchError, ConfigError, PocketPeftError
from pocketpeft.fleet import dp as DP
from pocketpeft.fleet import updates as U

A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
A1 = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
B1 = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
SHAPES = {A0: [4, 16], B0: [16, 4], A1: [4, 16], B1: [8, 4]}
BASE = "ab" * 32


def _delta(rng, scale=0.01):
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def test_flatten_roundtrip():
    rng = np.random.default_rng(0)
    d = _delta(rng)
    v = U.flatten(d)
    assert v.shape == (sum(int(np.prod(s)) for s in SHAPES.values()),)
    back = U.unflatten(v, SHAPES)
    assert all(np.array_equal(back[k], d[k]) for k in d)
    with pytest.raises(ConfigError):
        U.unflatten(v[:-1], SHAPES)


def test_valid_update_passes():
    d = _delta(np.random.default_rng(1))
    out = U.validate_update(d, SHAPES, base_sha256=BASE, update_base=U.base_id(BASE), max_norm=10.0)
    assert set(out) == set(SHAPES) and all(v.dtype == np.float32 for v in out.values())
    # the full hex digest is accepted as well as its numeric id
    U.validate_update(d, SHAPES, base_sha256=BASE, update_base=BASE)


@pytest.mark.parametrize(
    "reason, mutate, etype",
    [
        ("non_finite", lambda d: d[A0].__setitem__((0, 0), np.nan), U.NonFiniteUpdateError),
        ("non_finite", lambda d: d[B1].__setitem__((1, 1), np.inf), U.NonFiniteUpdateError),
        ("names", lambda d: d.pop(B0), AdapterShapeError),
        (
            "names",
            lambda d: d.__setitem__("base_model.model.lm_head.weight", np.zeros((2, 2), np.float32)),
            AdapterShapeError,
        ),
        ("shapes", lambda d: d.__setitem__(A0, np.zeros((4, 17), np.float32)), AdapterShapeError),
        ("format", lambda d: d.__setitem__(A0, np.zeros((4, 16), np.int32)), U.UpdateFormatError),
        ("norm", lambda d: d.__setitem__(A0, np.full((4, 16), 10.0, np.float32)), U.UpdateNormError),
    ],
)
def test_each_reject_reason(reason, mutate, etype):
    d = _delta(np.random.default_rng(2))
    mutate(d)
    counter = U.RejectCounter()
    with pytest.raises(etype) as ei:
        U.validate_update(d, SHAPES, base_sha256=BASE, update_base=U.base_id(BASE), max_norm=U.norm_bound(1.0))
    assert isinstance(ei.value, PocketPeftError) and ei.value.reason == reason
    counter.add(ei.value)
    assert counter.as_dict()[reason] == 1 and sum(counter.as_dict().values()) == 1


def test_reject_other_base():
    d = _delta(np.random.default_rng(3))
    for other in (U.base_id("cd" * 32), "cd" * 32, None):
        with pytest.raises(BaseModelMismatchError) as ei:
            U.validate_update(d, SHAPES, base_sha256=BASE, update_base=other)
        assert ei.value.reason == "base"


def test_reject_empty_or_not_a_mapping():
    for bad in ({}, [1, 2], None):
        with pytest.raises(U.UpdateFormatError):
            U.validate_update(bad, SHAPES)


def test_norm_bound_accepts_honest_noisy_updates():
    """A clipped update plus its noise share stays under the bound; 3x clip does not."""
    rng = np.random.default_rng(4)
    dim = sum(int(np.prod(s)) for s in SHAPES.values())
    std = U.client_noise_std(1.0, 0.5, 4)
    bound = U.norm_bound(0.5, std, dim)
    for _ in range(200):
        d, _ = U.clip_update(_delta(rng, 1.0), 0.5)
        d = U.add_gaussian_noise(d, std, rng)
        assert U.l2_norm(d) <= bound
    big = {k: v * (3 * 0.5 / U.l2_norm(d)) for k, v in _delta(rng, 1.0).items()}
    assert U.l2_norm(big) > U.norm_bound(0.5)
    assert U.norm_bound(None) == math.inf


def test_clipping():
    rng = np.random.default_rng(5)
    d = _delta(rng, 1.0)
    norm = U.l2_norm(d)
    clipped, before = U.clip_update(d, norm / 4)
    assert before == pytest.approx(norm)
    assert U.l2_norm(clipped) == pytest.approx(norm / 4, rel=1e-5)
    # direction kept
    assert np.allclose(U.flatten(clipped) * 4, U.flatten(d), rtol=1e-4, atol=1e-6)
    small, _ = U.clip_update(d, norm * 2)  # under the bound: unchanged
    assert all(np.array_equal(small[k], d[k]) for k in d)
    with pytest.raises(ConfigError):
        U.clip_update(d, 0.0)


def test_noise_statistics():
    """Each client's noise has std z*C/sqrt(m); the sum over m clients has std z*C."""
    z, c, m = 1.3, 0.7, 16
    std = U.client_noise_std(z, c, m)
    assert std == pytest.approx(z * c / 4)
    zero = {k: np.zeros((200, 50), np.float32) for k in ("a", "b")}
    rng = np.random.default_rng(6)
    one = U.flatten(U.add_gaussian_noise(zero, std, rng))
    assert abs(one.mean()) < 3 * std / math.sqrt(one.size)
    assert one.std() == pytest.approx(std, rel=0.02)
    total = sum(U.flatten(U.add_gaussian_noise(zero, std, rng)) for _ in range(m))
    assert total.std() == pytest.approx(z * c, rel=0.02)
    assert U.add_gaussian_noise(zero, 0.0)["a"].any() == False  # noqa: E712
    with pytest.raises(ConfigError):
        U.add_gaussian_noise(zero, -1.0)


def test_fedavg_matches_numpy():
    rng = np.random.default_rng(7)
    deltas = [_delta(rng) for _ in range(5)]
    w = [3, 1, 10, 4, 2]
    got = U.fedavg(deltas, w)
    for k in SHAPES:
        want = sum(wi * d[k].astype(np.float64) for wi, d in zip(w, deltas)) / sum(w)
        np.testing.assert_allclose(got[k], want, rtol=1e-6, atol=1e-9)
    unweighted = U.fedavg(deltas)
    for k in SHAPES:
        np.testing.assert_allclose(unweighted[k], np.mean([d[k] for d in deltas], axis=0), rtol=1e-6, atol=1e-9)
    with pytest.raises(ConfigError):
        U.fedavg([])
    with pytest.raises(ConfigError):
        U.fedavg(deltas, [1, 2])


def test_fedsa_shares_and_updates_only_lora_a():
    names = U.shared_names(SHAPES, fedsa=True)
    assert names == sorted([A0, A1])
    assert U.shared_names(SHAPES) == sorted(SHAPES)
    rng = np.random.default_rng(8)
    glob = _delta(rng, 1.0)
    deltas = [{k: v for k, v in _delta(rng).items() if k in names} for _ in range(3)]
    mean = U.fedavg(deltas, [1, 2, 3])
    new = U.apply_delta(glob, mean)
    for k in SHAPES:
        if k in names:
            want = glob[k] + (deltas[0][k] + 2 * deltas[1][k] + 3 * deltas[2][k]) / 6
            np.testing.assert_allclose(new[k], want, rtol=1e-5, atol=1e-7)
        else:
            assert np.array_equal(new[k], glob[k])  # B untouched by an A-only round


def test_accountant_matches_dp_accounting():
    import dp_accounting
    from dp_accounting import rdp

    z, q, rounds, delta = 1.1, 0.1, 50, 1e-5
    acc = rdp.RdpAccountant()
    acc.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
        )
    )
    assert DP.epsilon(z, q, rounds, delta) == pytest.approx(acc.get_epsilon(delta))


def test_accountant_monotonic_and_calibration():
    eps = [DP.epsilon(1.0, 0.2, r) for r in (1, 5, 20, 80)]
    assert eps == sorted(eps) and len(set(eps)) == 4  # more rounds, more epsilon
    by_noise = [DP.epsilon(z, 0.2, 20) for z in (0.8, 1.0, 2.0, 4.0)]
    assert by_noise == sorted(by_noise, reverse=True)  # more noise, less epsilon
    by_rate = [DP.epsilon(1.0, q, 20) for q in (0.05, 0.2, 0.5, 1.0)]
    assert by_rate == sorted(by_rate)
    z = DP.noise_for_epsilon(4.0, 0.2, 20)
    assert DP.epsilon(z, 0.2, 20) <= 4.0 + 1e-6
    assert DP.epsilon(z * 0.98, 0.2, 20) > 4.0  # and it is the smallest such multiplier (to 2%)
    rec = DP.DpConfig(1.0, z, 0.2, 20).record()
    assert set(rec) == {"epsilon", "delta", "noise_multiplier", "clip_norm", "sampling_rate", "rounds", "accountant"}
    assert rec["accountant"] == "dp_accounting RDP" and rec["delta"] == 1e-5
    with pytest.raises(ConfigError):
        DP.epsilon(0.0, 0.2, 20)
    with pytest.raises(ConfigError):
        DP.noise_for_epsilon(-1, 0.2, 20)


def test_poisson_sampling_rate():
    rng = np.random.default_rng(9)
    nodes = list(range(2000))
    picked = DP.poisson_sample(nodes, 0.25, rng)
    assert abs(len(picked) - 500) < 4 * math.sqrt(2000 * 0.25 * 0.75)
