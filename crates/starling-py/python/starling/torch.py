"""Between Starling's arrays (a dict of float32 NumPy arrays by tensor name) and a PyTorch
``state_dict``. torch is imported when a function is called, so ``import starling`` never
needs it.

A model trained with PyTorch takes part when its ``state_dict`` names and shapes match the
task's tensors::

    model.load_state_dict(starling.torch.to_state_dict(device.model()))
    ...  # train
    device.submit(weights=starling.torch.from_state_dict(model.state_dict()), examples=n)
"""

import numpy as np


def to_state_dict(arrays):
    """A ``state_dict`` (an ordered dict of float32 CPU tensors) from a dict of arrays."""
    import collections

    import torch

    return collections.OrderedDict(
        (name, torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)).clone())
        for name, value in arrays.items()
    )


def from_state_dict(state_dict):
    """A dict of float32 NumPy arrays from a ``state_dict`` (any device, detached)."""
    return {
        name: tensor.detach().to("cpu").float().numpy().copy()
        for name, tensor in state_dict.items()
    }
