"""Divisors of any positive integer, fast: trial division by the primes below 1000, then Miller-Rabin
and Pollard's rho (Brent's variant) for what remains. Enumerating candidates up to sqrt(n) took
O(sqrt n) steps: 2**31 iterations for a --global-batch of 2**62 (issue 18).

Miller-Rabin with the first 12 prime bases is exact below 3.3e24 (Sorenson and Webster 2015,
"Strong pseudoprimes to twelve prime bases"); above that it is probabilistic with error < 4**-12.
"""

from __future__ import annotations

import math
import random
from collections import Counter

_SMALL_PRIMES = [p for p in range(2, 1000) if all(p % q for q in range(2, math.isqrt(p) + 1))]
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _rho(n: int) -> int:
    """A non-trivial factor of a composite odd n (Brent 1980, "An improved Monte Carlo factorization")."""
    rng = random.Random(n)  # deterministic per n
    while True:
        y, c, m = rng.randrange(1, n), rng.randrange(1, n), 128
        g = r = q = 1
        x = ys = y
        while g == 1:
            x = y
            for _ in range(r):
                y = (y * y + c) % n
            k = 0
            while k < r and g == 1:
                ys = y
                for _ in range(min(m, r - k)):
                    y = (y * y + c) % n
                    q = q * abs(x - y) % n
                g = math.gcd(q, n)
                k += m
            r *= 2
        if g == n:
            g = 1
            while g == 1:
                ys = (ys * ys + c) % n
                g = math.gcd(abs(x - ys), n)
        if g != n:
            return g


def prime_factors(n: int) -> Counter:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"prime_factors needs a positive integer, got {n!r}")
    found: Counter = Counter()
    for p in _SMALL_PRIMES:
        while n % p == 0:
            found[p] += 1
            n //= p
    stack = [n] if n > 1 else []
    while stack:
        m = stack.pop()
        if is_prime(m):
            found[m] += 1
        else:
            f = _rho(m)
            stack += [f, m // f]
    return found


def divisors(n: int) -> list[int]:
    """Every positive divisor of n, ascending."""
    result = [1]
    for p, k in prime_factors(n).items():
        result = [d * p**e for d in result for e in range(k + 1)]
    return sorted(result)
