"""Numerical checks of the entropy-control theory (the theory lab, ``tools/theory_lab.py``).

- ``softmax``: exact entropy dynamics of tabular softmax policies (claims 1-2);
- ``bandit``: a multi-prompt bandit trained with the project's GRPO loss and regularizer
  callbacks (claims 3 and 5);
- ``tokens``: synthetic rollout-shaped token batches and covariance sparsity (claim 4);
- ``claims``: the five experiments as functions returning JSON-ready dicts.
"""
