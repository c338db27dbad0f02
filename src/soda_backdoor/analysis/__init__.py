"""Hooks on named layers and causal attribution of hidden neurons."""

from .effects import AttributionConfig, NeuronEffects, class_attribution, compute_neuron_effects, naive_class_attribution
from .hooks import LayerRef, activations, capture, default_layer, intervene, layer_names, parse_layer

__all__ = ["AttributionConfig", "LayerRef", "NeuronEffects", "activations", "capture", "class_attribution",
           "compute_neuron_effects", "default_layer", "intervene", "layer_names", "naive_class_attribution",
           "parse_layer"]
