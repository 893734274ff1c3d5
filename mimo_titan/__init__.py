"""mimo_titan: multimodal MIMO training with per-module DeviceMeshes."""
