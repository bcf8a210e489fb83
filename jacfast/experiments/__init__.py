"""The paper's experiments on real data, one module per command (``python -m jacfast ...``).

- :mod:`.distill`: (a) distillation with limited data, and RQ5 (which outputs' Jacobians).
- :mod:`.prop1`: Proposition 1 (noise vs. Jacobian matching), in training and Monte-Carlo.
- :mod:`.robustness`: (b) robustness to input noise.
- :mod:`.transfer`: (c) transfer from a teacher trained on other Fashion-MNIST classes.
- :mod:`.stats`: paired differences with t confidence intervals; :mod:`.common`: shared machinery.
"""
