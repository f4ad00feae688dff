"""Paper §3.2 / §4 testing, App. A protocol 2 and App. B descriptors: the test protocol as one frozen value
(`protocol.TestProtocol`) and the one forward-pass builder every consumer runs (`executor`).

`runner` schedules the batches; `evaluate`, `transfer`, the notebook API
(`vgg_jax.inference.Classifier`) and App. A's protocol 2 (`vgg_jax.localisation.dense`) all go through it.
"""
