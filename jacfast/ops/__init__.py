"""``torch.library`` registrations of jacfast's kernels (``torch.ops.jacfast.*``)."""
