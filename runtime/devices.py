"""The --device values, named once: ONNX Runtime's providers and OpenVINO on the CPU. Imports
neither, so that every command's options can list them."""

# --device value -> OpenVINO's inference precision on the CPU
OPENVINO_PRECISIONS = {"openvino": "f32", "openvino-bf16": "bf16"}
OPENVINO_DEVICES = tuple(OPENVINO_PRECISIONS)
DEVICES = ("auto", "cpu", "cuda", "tensorrt", *OPENVINO_DEVICES)
