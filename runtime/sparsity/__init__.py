"""Activation sparsity: corpus, profiler, thresholds, predictors, and the neuron-aware FFN kernel."""
