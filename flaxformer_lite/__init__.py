"""flaxformer_lite: Transformers and recurrent baselines on long-range dependency tasks,
trained with JAX/Flax on any device mesh, compared in TensorBoard."""

__version__ = '0.1.0'
