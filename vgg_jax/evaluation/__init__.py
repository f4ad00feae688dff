"""Paper §3.2 / §4 testing, App. A protocol 2 and App. B descriptors: the test protocol as one frozen value
(`protocol.TestProtocol`) and the one forward-pass builder every consumer runs (`executor`).

`vgg_jax.runner` schedules the batches; `vgg_jax.evaluate`, `vgg_jax.transfer`, the notebook API
(`vgg_jax.inference.Classifier`) and App. A's protocol 2 (`vgg_jax.localise_dense`) all go through it.
"""
