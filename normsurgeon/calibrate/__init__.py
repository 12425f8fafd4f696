"""Statistics re-estimation (``recalibrate``), evaluation (``evaluate``), noise models and data.

- :mod:`~normsurgeon.calibrate.data`: DATA specs (.npz/.pt, ImageFolder, ``digits``) and checks
- :mod:`~normsurgeon.calibrate.plan`: samples -> batches -> ranks; does the data fit the model
- :mod:`~normsurgeon.calibrate.stats`: exact pooled moments in float64
- :mod:`~normsurgeon.calibrate.protocol`: which layers are re-estimated (torch BN adapter + protocol)
- :mod:`~normsurgeon.calibrate.noise`: simulated analog weight noise, fixed or resampled
- :mod:`~normsurgeon.calibrate.recalibrate`, :mod:`~normsurgeon.calibrate.evaluate`: the two verbs
- :mod:`~normsurgeon.calibrate.distributed`: torchrun data parallelism (shard, all-reduce sums)
- :mod:`~normsurgeon.calibrate.digits_cnn`: the small CNN the acceptance test and examples train
"""
