"""planner.factor.divisors: exact for every integer, and not O(sqrt n) (issue 18: `--global-batch
2**62` and `--gpus 2**40` hung in a sqrt(n) loop). A slow implementation would not finish these
cases before the suite's timeout; no wall-clock assert is needed."""

from __future__ import annotations

import math

import pytest

from planner.factor import divisors, is_prime, prime_factors


def test_small_numbers_match_brute_force():
    for n in range(1, 2000):
        assert divisors(n) == [d for d in range(1, n + 1) if n % d == 0]


@pytest.mark.parametrize("n", [2**62, 2**63, 2**40, 2**61 - 1, (2**61 - 1) * (2**31 - 1), 10**18 + 9,
                               (10**9 + 7) * (10**9 + 9), 2**89 - 1, 720720 * 2**40, 3**39])
def test_large_numbers(n):
    found = divisors(n)
    assert found[0] == 1 and found[-1] == n and found == sorted(set(found))
    assert all(n % d == 0 for d in found)
    factors = prime_factors(n)
    assert math.prod(p**k for p, k in factors.items()) == n and all(is_prime(p) for p in factors)
    assert len(found) == math.prod(k + 1 for k in factors.values())  # every divisor, none missed


def test_primality_agrees_with_trial_division():
    for n in range(0, 5000):
        assert is_prime(n) == (n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1)))


def test_refuses_non_positive():
    for bad in (0, -4, True, 2.0):
        with pytest.raises(ValueError):
            prime_factors(bad)


@pytest.mark.parametrize("n", [3215031751, 2152302898747, 3474749660383, 341550071728321,
                               3825123056546413051])  # strong pseudoprimes to the first 4..9 prime bases
def test_strong_pseudoprimes_are_composite(n):
    assert not is_prime(n)
    factors = prime_factors(n)
    assert len(factors) > 1 and math.prod(p**k for p, k in factors.items()) == n
