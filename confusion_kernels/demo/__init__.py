"""The main job, ``python -m confusion_kernels demo``: what the losses do on real data and how
fast the kernels are on this machine, written as a Markdown report with figures.

Modules: ``data`` (imbalanced digits), ``training`` (the network and the six methods),
``evaluation`` (scores, out-of-distribution AUROC), ``speed`` (fused vs eager timings),
``report`` (figures and the Markdown file), ``cli`` (the command line).
"""
