"""Data preparation for MVG: medical volumes -> 2D PNG slices in the authors' folder layout.

    python -m datasets.prepare --help          # volumes -> <out_root>/<dataset>/<folder>/<case>/<slice>.png
    python -m datasets.prepare verify <root>   # checks a prepared root

Library side: `datasets.manifest` reads what `prepare` wrote (cases, splits, slice paths, geometry).
"""
