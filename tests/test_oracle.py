"""The oracle against SEMANTICS.md's worked examples and properties; geometry.neighborhood vs oracle."""

import itertools

import numpy as np
import pytest

import oracle

WORKED = [
    # (L, k, s, d, causal, expected keys per query)
    (7, 3, 1, 1, False, [{0, 1, 2}, {0, 1, 2}, {1, 2, 3}, {2, 3, 4}, {3, 4, 5}, {4, 5, 6}, {4, 5, 6}]),
    (10, 3, 1, 2, False, [{0, 2, 4}, {1, 3, 5}, {0, 2, 4}, {1, 3, 5}, {2, 4, 6}, {3, 5, 7}, {4, 6, 8},
                          {5, 7, 9}, {4, 6, 8}, {5, 7, 9}]),
    (8, 4, 2, 1, True, [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {2, 3, 4}, {2, 3, 4, 5}, {4, 5, 6},
                        {4, 5, 6, 7}]),
]


def _valid_params(max_len=14):
    for L in range(2, max_len + 1):
        for k in range(2, L + 1):
            for d in range(1, L // k + 1):
                for s in range(1, k + 1):
                    for c in (False, True):
                        yield L, k, s, d, c


ALL_1D = list(_valid_params())


@pytest.mark.parametrize("L,k,s,d,c,expected", WORKED)
def test_oracle_worked_examples(L, k, s, d, c, expected):
    got = oracle.axis_keys(L, k, s, d, c)
    assert [set(x) for x in got] == expected


def test_group_length_formula_counts_the_group():
    for L in range(1, 30):
        for d in range(1, L + 1):
            for g in range(d):
                assert oracle.group_len(L, d, g) == len(range(g, L, d)), (L, d, g)


def test_oracle_properties_1d():
    n = 0
    for L, k, s, d, c in ALL_1D:
        keys = oracle.axis_keys(L, k, s, d, c)
        for i, ks in enumerate(keys):
            assert ks == sorted(ks) and len(set(ks)) == len(ks)
            assert all(0 <= j < L for j in ks)
            assert all(j % d == i % d for j in ks), "keys outside the dilation group"
            if c:
                assert i in ks and max(ks) == i, "causal: sees itself and nothing later"
                assert 1 <= len(ks) <= k
            else:
                assert len(ks) == k, "non-causal: exactly k keys (shifted inward, never padded)"
            # keys are contiguous positions inside the group
            pos = [j // d for j in ks]
            assert pos == list(range(pos[0], pos[0] + len(pos)))
            n += 1
        if not c:
            # Queries of one stride group (same dilation group, same p // s) share their window.
            for i, j in itertools.combinations(range(L), 2):
                if i % d == j % d and (i // d) // s == (j // d) // s:
                    assert keys[i] == keys[j]
    assert n > 5000


def test_oracle_stride1_centered_interior():
    # Away from the borders a stride-1 odd window is centered on the query.
    for L, k in [(15, 3), (15, 5), (20, 7)]:
        keys = oracle.axis_keys(L, k)
        for i in range(k // 2, L - k // 2):
            assert keys[i] == list(range(i - k // 2, i + k // 2 + 1))
    # Even k: one fewer key on the right.
    keys = oracle.axis_keys(12, 4)
    assert keys[6] == [4, 5, 6, 7]


def test_oracle_full_attention_when_k_equals_L():
    for L in range(2, 12):
        assert all(ks == list(range(L)) for ks in oracle.axis_keys(L, L))
    m = oracle.mask((4, 5, 3), (4, 5, 3))
    assert m.all()
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 4, 5, 3, 2, 4)), rng.standard_normal((1, 4, 5, 3, 2, 4)), \
        rng.standard_normal((1, 4, 5, 3, 2, 6))
    out, lse = oracle.attention(q, k, v, (4, 5, 3))
    qf, kf, vf = q.reshape(60, 2, 4), k.reshape(60, 2, 4), v.reshape(60, 2, 6)
    s = np.einsum("nhd,mhd->hnm", qf, kf) * 0.5
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("hnm,mhd->nhd", p / p.sum(-1, keepdims=True), vf)
    np.testing.assert_allclose(out.reshape(60, 2, 6), ref, rtol=1e-12, atol=1e-12)
    ref_lse = np.log(np.exp(s).sum(-1)).T
    np.testing.assert_allclose(lse.reshape(60, 2), ref_lse, rtol=1e-12)


def test_oracle_blocked_attention_when_stride_equals_k():
    for L, k in [(12, 3), (12, 4), (16, 4), (15, 5)]:
        keys = oracle.axis_keys(L, k, s=k)
        causal = oracle.axis_keys(L, k, s=k, causal=True)
        for i in range(L):
            b = (i // k) * k
            assert keys[i] == list(range(b, b + k)), (L, k, i)
            assert causal[i] == list(range(b, i + 1)), (L, k, i)
    # Partial last block: shifted inward to a full window of k.
    keys = oracle.axis_keys(10, 4, s=4)
    assert keys[9] == [6, 7, 8, 9] and keys[8] == [6, 7, 8, 9] and keys[4] == [4, 5, 6, 7]


def test_oracle_mask_is_and_over_axes():
    S, ks, ss, ds, cs = (5, 7), (3, 4), (1, 2), (1, 1), (True, False)
    m = oracle.mask(S, ks, ss, ds, cs)
    a0, a1 = oracle.axis_keys(5, 3, 1, 1, True), oracle.axis_keys(7, 4, 2, 1, False)
    for i, j in itertools.product(range(5), range(7)):
        want = {np.ravel_multi_index((x, y), S) for x in a0[i] for y in a1[j]}
        n = np.ravel_multi_index((i, j), S)
        assert set(np.nonzero(m[n])[0]) == want
        assert sorted(oracle.query_keys((i, j), S, ks, ss, ds, cs)) == sorted(want)


def test_oracle_attention_matches_manual_softmax_with_gqa_and_additional_kv():
    rng = np.random.default_rng(1)
    B, L, H, Hkv, D, Dv, Na = 2, 7, 4, 2, 3, 5, 2
    q = rng.standard_normal((B, L, H, D))
    k = rng.standard_normal((B, L, Hkv, D))
    v = rng.standard_normal((B, L, Hkv, Dv))
    ak = rng.standard_normal((B, Na, Hkv, D))
    av = rng.standard_normal((B, Na, Hkv, Dv))
    out, lse = oracle.attention(q, k, v, 3, scale=0.7, add_k=ak, add_v=av)
    keys = WORKED[0][-1]
    for b, i, h in itertools.product(range(B), range(L), range(H)):
        hk = h // 2
        kk = np.concatenate([k[b, sorted(keys[i]), hk], ak[b, :, hk]])
        vv = np.concatenate([v[b, sorted(keys[i]), hk], av[b, :, hk]])
        s = 0.7 * kk @ q[b, i, h]
        np.testing.assert_allclose(lse[b, i, h], np.log(np.sum(np.exp(s))), rtol=1e-12)
        np.testing.assert_allclose(out[b, i, h], np.exp(s - lse[b, i, h]) @ vv, rtol=1e-10, atol=1e-12)
    # spot evaluation equals the full one
    o2, l2 = oracle.attention(q, k, v, 3, scale=0.7, add_k=ak, add_v=av, queries=[(0,), (6,), (3,)])
    np.testing.assert_array_equal(o2, out[:, [0, 6, 3]])
    np.testing.assert_array_equal(l2, lse[:, [0, 6, 3]])


def test_oracle_window_tables_consistent_with_keys():
    for L, k, s, d, c in ALL_1D:
        if s != 1:
            continue
        tok, valid, bias = oracle.axis_window(L, k, d, c)
        keys = oracle.axis_keys(L, k, 1, d, c)
        for i in range(L):
            assert sorted(tok[i][valid[i]].tolist()) == keys[i]
            assert tok[i][valid[i]].tolist() == keys[i], "window entries run in key order"
            # entry index = key position - window start: consecutive from 0
            assert valid[i][: len(keys[i])].all()
            b = bias[i][valid[i]]
            assert (b == np.array(keys[i]) // d - i // d + k - 1).all()
            assert b.min() >= 0 and b.max() <= 2 * k - 2


def test_oracle_unfused_compose_to_attention():
    rng = np.random.default_rng(2)
    S, ks, ds, cs = (5, 6), (3, 4), (1, 1), (False, True)
    q = rng.standard_normal((1, *S, 4, 3))
    k = rng.standard_normal((1, *S, 2, 3))
    v = rng.standard_normal((1, *S, 2, 5))
    s = oracle.qk(q, k, ks, ds, cs)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    out = oracle.av(p, v, ks, ds, cs)
    ref, _ = oracle.attention(q, k, v, ks, 1, ds, cs)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- package geometry

@pytest.mark.parametrize("L,k,s,d,c,expected", WORKED)
def test_geometry_worked_examples(L, k, s, d, c, expected):
    from jax_na import geometry
    got = geometry.neighborhood(L, k, stride=s, dilation=d, is_causal=c)
    assert [set(x) for x in got] == expected
    assert all(list(x) == sorted(x) for x in got)


def test_geometry_neighborhood_equals_oracle_exhaustive():
    from jax_na import geometry
    n = 0
    for L, k, s, d, c in ALL_1D:
        got = geometry.neighborhood(L, k, s, d, c)
        want = oracle.axis_keys(L, k, s, d, c)
        assert [list(map(int, x)) for x in got] == want, (L, k, s, d, c)
        n += 1
    assert n > 1000


def test_geometry_neighborhood_larger_lengths():
    from jax_na import geometry
    rng = np.random.default_rng(3)
    for _ in range(150):
        L = int(rng.integers(20, 120))
        k = int(rng.integers(2, min(L, 40) + 1))
        d = int(rng.integers(1, L // k + 1))
        s = int(rng.integers(1, k + 1))
        c = bool(rng.integers(0, 2))
        assert [list(map(int, x)) for x in geometry.neighborhood(L, k, s, d, c)] == \
            oracle.axis_keys(L, k, s, d, c), (L, k, s, d, c)
