"""Theory experiments a researcher can run from the command line.

    python -m ppma_mask.experiments scaling --out DIR   # time L·x three ways, fit log-log slopes
    python -m ppma_mask.experiments figures --out DIR   # masks seen by one query; L, L_H, L_V

``scaling`` writes scaling.json, scaling.md and scaling.png; ``figures`` writes query_masks.png,
factor_matrices.png and figures.json. Matplotlib (Agg backend) is imported only when a plot is
drawn, so importing this package needs nothing beyond NumPy and SciPy.
"""
