"""SavedModel to TFLite and ONNX, each checked against the SavedModel."""
