"""What a run is made of around the step: the training data, the losses,
optimizers and stateful metrics, evaluation, the run's variables, actions and
Keras callbacks, the export of the model."""
