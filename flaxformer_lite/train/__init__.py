"""Training: state, optimizer, losses, pure steps, checkpoints and the one loop."""

from flaxformer_lite.train.hooks import RunHooks
from flaxformer_lite.train.loop import train_and_evaluate

__all__ = ['RunHooks', 'train_and_evaluate']
