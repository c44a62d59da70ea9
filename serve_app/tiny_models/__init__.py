"""Random-weight checkpoints of every served family, tiny enough for tests and `grounded-serve make-tiny-models`:
real architectures and the real loading code, without a model hub."""
