"""The torch-free side: ONNX Runtime sessions and the bundle segmenter (never imports torch)."""
