"""Experiment layer of ``compams_jax``: models, real-data loaders and drivers.

The submodules are deliberately not imported here, so that importing
``compams_jax.experiments`` stays cheap and does not pull in flax or
scikit-learn.  Import what you need explicitly, e.g.::

    from compams_jax.experiments import models, data
    model = models.create_model("mnist_cnn", num_classes=10)
    ds = data.load_dataset("digits")
"""
