"""Flax models: ResNet backbones and the ProtoMask network."""
