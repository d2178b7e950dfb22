"""The unbiased pass@k estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code")."""
from __future__ import annotations

from collections.abc import Iterable


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n passes) = 1 - C(n-c, k) / C(n, k).

    C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i), a product of numbers in [0, 1]: no huge binomials.
    """
    n, c = num_samples, num_correct
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= correct <= samples and 1 <= k <= samples, got n={n}, c={c}, k={k}")
    if n - c < k:                      # every draw of k holds a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(counts: Iterable[tuple[int, int]], ks: Iterable[int]) -> dict[str, float]:
    """``{"pass@k": mean over problems}`` from (samples, correct) per problem, for every k <= all sample counts."""
    counts = list(counts)
    if not counts:
        return {}
    fewest = min(n for n, _ in counts)
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks if k <= fewest}
