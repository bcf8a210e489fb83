"""The floating dtypes every kernel and entry point of jacfast accepts (one definition)."""
import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
