"""The core: the config and its validation, the exceptions, step classes and
incident kinds, every reach into TensorFlow and Keras internals, the
distribution helpers and host reads of variables. Everything imports it; it
imports nothing else of safetrain."""
