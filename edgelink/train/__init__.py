"""Heterogeneous bridges (issue #5): data splits and a differentiable torch receiver."""
