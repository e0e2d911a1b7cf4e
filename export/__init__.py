"""The torch side: ResCLIP on open_clip (the reference), the text bank, ONNX export."""
