"""Lab code that studies lit_covrl rather than being part of it: the theory lab's experiments
(`lab.theory`: softmax policies, bandits, synthetic token batches, the claims checked by
`tools/theory_lab.py`) and the analysis of comparison runs (`lab.analysis`: TensorBoard scalars
to summary rows, the entropy law R = -a exp(H) + b; used by `tools/compare.py` and
`tools/fit_entropy_law.py`). Not installed with the library: run from a checkout (tools/ and the
tests put the repository root on the import path)."""
